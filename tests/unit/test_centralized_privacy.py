"""The centralized reference under each DP mode: accounting against Opacus, resume, budgets, sigma = 0.

The reference runs the same privacy code as the Flower apps (``ServerPrivacy`` and, per client,
``fedmeta.privacy.client_update``); ``tests/integration/test_privacy_simulation.py`` checks that
a real Flower simulation releases the same aggregates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import Config
from fedmeta.errors import BudgetExhausted
from fedmeta.outputs import read_metrics
from fedmeta.privacy.accountant import epsilon_for
from fedmeta.privacy.budget import BudgetTarget, rounds_that_fit
from fedmeta.sampling import sample_clients
from tests.privacy_helpers import dp_config, opacus_rdp_epsilon


def expected_epsilon(cfg: Config, round_idx: int) -> float:
    """What Opacus says each mode has spent after ``round_idx`` rounds, from first principles."""
    p, f = cfg.privacy, cfg.federation
    if p.mode == "client-central":
        return opacus_rdp_epsilon(p.noise_multiplier, f.clients_per_round / f.clients_total, round_idx)
    counts: dict[int, int] = {}
    for r in range(1, round_idx + 1):
        for c in sample_clients(cfg.seed, r, f.clients_total, f.clients_per_round):
            counts[c] = counts.get(c, 0) + 1
    most = max(counts.values())
    if p.mode == "client-local":  # sensitivity 2C, no amplification
        return opacus_rdp_epsilon(p.noise_multiplier / 2, 1.0, most)
    assert cfg.task.tasks_per_site is not None
    q = cfg.meta.tasks_per_client / cfg.task.tasks_per_site
    return opacus_rdp_epsilon(p.noise_multiplier, q, most * cfg.meta.local_steps)


class _Stop(Exception):
    pass


def _interrupt_at(round_idx: int) -> Any:
    def progress(r: int, row: dict[str, Any]) -> None:
        if r == round_idx:
            raise _Stop(f"interrupted in round {r}")

    return progress


@pytest.mark.parametrize("mode", ["client-central", "client-local", "task"])
def test_epsilon_every_round_equals_opacus_and_a_resumed_run_equals_an_uninterrupted_one(
    mode: str, tmp_path: Path
) -> None:
    cfg = dp_config(mode)
    full = run_centralized(cfg, tmp_path / "full")
    rows = {r["round"]: r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["round"] > 0}
    assert sorted(rows) == list(range(1, 7))
    for r, row in rows.items():
        assert row["privacy"]["epsilon"] == pytest.approx(expected_epsilon(cfg, r), rel=1e-6), r
        assert row["train"] == {}  # no unprivatized training metrics under DP
    assert full["privacy"]["epsilon"] == pytest.approx(expected_epsilon(cfg, 6), rel=1e-6)
    assert (
        full["privacy"]["mode"] == mode
        and full["privacy"]["clip_norm"] == 0.5
        and full["privacy"]["noise_multiplier"] == 1.2
    )

    # interrupted after round 4, then resumed: nothing counted twice. The reference is the
    # federated server's round loop, which checkpoints every round (it used to checkpoint only on
    # evaluation rounds, here round 3), so the checkpoint holds round 4.
    with pytest.raises(_Stop):
        run_centralized(cfg, tmp_path / "cut", progress=_interrupt_at(4))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["round"] == 4
    resumed = run_centralized(cfg, tmp_path / "cut", resume=True)
    again = {r["round"]: r for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if r["round"] > 0}
    assert sorted(again) == list(range(1, 7))
    for r in range(1, 7):
        assert again[r]["privacy"]["epsilon"] == pytest.approx(rows[r]["privacy"]["epsilon"], rel=1e-9), r
        assert again[r]["clients"] == rows[r]["clients"]
    assert resumed["privacy"]["epsilon"] == pytest.approx(full["privacy"]["epsilon"], rel=1e-9)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert a["accountant"] == b["accountant"]
    for k, v in a["meta_params"].items():  # same cohorts and the same noise after the restart
        torch.testing.assert_close(b["meta_params"][k], v, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["client-central", "client-local"])
def test_noiseless_run_with_a_huge_clip_norm_equals_the_non_private_run(mode: str, tmp_path: Path) -> None:
    # client-central samples every client when clients_per_round = clients_total (q = 1), as the
    # non-private run does; client-local samples like the non-private run anyway
    per_round = 6 if mode == "client-central" else 3
    private = run_centralized(
        dp_config(mode, total=6, per_round=per_round, rounds=4, noise_multiplier=0.0, clip_norm=1e9), tmp_path / "dp"
    )
    plain_cfg = dp_config("none", total=6, per_round=per_round, rounds=4)
    plain = run_centralized(plain_cfg, tmp_path / "plain")
    assert private["privacy"]["epsilon"] is None and private["privacy"]["epsilon_unbounded"] is True
    a = load_checkpoint(tmp_path / "dp" / "checkpoint.pt")["meta_params"]
    b = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["meta_params"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-7)
    assert private["final"]["post_adapt_loss"] == pytest.approx(plain["final"]["post_adapt_loss"], rel=1e-5)


def test_on_budget_stop_ends_cleanly_after_the_last_round_that_fits(tmp_path: Path) -> None:
    cfg = dp_config("client-central", rounds=40, noise_multiplier=0.9, target_epsilon=6.0, on_budget="stop")
    fit = rounds_that_fit(BudgetTarget(6.0, 1e-5, 4 / 12), noise_multiplier=0.9, max_rounds=40)
    assert 1 < fit < 40
    summary = run_centralized(cfg, tmp_path)
    assert summary["rounds_completed"] == fit and summary["rounds_planned"] == 40
    priv = summary["privacy"]
    assert priv["stopped_by_budget"] is True and priv["rounds_allowed"] == fit and priv["target_epsilon"] == 6.0
    assert priv["epsilon"] <= 6.0 < epsilon_for(noise_multiplier=0.9, sample_rate=4 / 12, steps=fit + 1, delta=1e-5)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[-1]["round"] == fit and "eval" in rows[-1]  # the last round that fits is evaluated
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["round"] == fit and state["accountant"]["accountant"]["steps"] == [fit]
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["privacy"]["epsilon"] == pytest.approx(priv["epsilon"])


def test_over_budget_run_refuses_to_start_and_writes_nothing(tmp_path: Path) -> None:
    cfg = dp_config("client-central", rounds=40, noise_multiplier=0.9, target_epsilon=6.0)
    fit = rounds_that_fit(BudgetTarget(6.0, 1e-5, 4 / 12), noise_multiplier=0.9, max_rounds=40)
    with pytest.raises(BudgetExhausted, match=rf"only {fit} rounds fit.*set federation.rounds to at most {fit}"):
        run_centralized(cfg, tmp_path / "refused")
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    # a target already exceeded by a single round is refused even with on_budget: stop
    first = epsilon_for(noise_multiplier=0.9, sample_rate=4 / 12, steps=1, delta=1e-5)
    tiny = dp_config("client-central", rounds=40, noise_multiplier=0.9, target_epsilon=first / 2, on_budget="stop")
    with pytest.raises(BudgetExhausted, match=r"only 0 rounds fit"):
        run_centralized(tiny, tmp_path / "tiny")
    assert math.isfinite(first)


def test_resuming_a_run_whose_checkpoint_already_exceeds_the_target_is_refused(tmp_path: Path) -> None:
    run_centralized(dp_config("client-central", rounds=6, noise_multiplier=0.9), tmp_path)
    # a lower target that three rounds fit: a fresh run would stop after round 3, but this one has done 6
    three = epsilon_for(noise_multiplier=0.9, sample_rate=4 / 12, steps=3, delta=1e-5)
    lower = dp_config("client-central", rounds=6, noise_multiplier=0.9, target_epsilon=three * 1.01, on_budget="stop")
    with pytest.raises(BudgetExhausted, match=r"already spent epsilon=.* more than privacy.target_epsilon"):
        run_centralized(lower, tmp_path, resume=True)


def test_the_example_dp_config_is_within_its_budget_and_trains(repo_root: Path, tmp_path: Path) -> None:
    from fedmeta.config import load_config
    from fedmeta.privacy.budget import plan_privacy

    cfg = load_config(repo_root / "configs" / "sinusoid-dp.yaml")
    plan = plan_privacy(cfg)
    assert cfg.privacy.mode == "client-central" and plan.within_budget
    assert (
        cfg.privacy.target_epsilon is not None
        and 0.9 * cfg.privacy.target_epsilon < plan.epsilon <= cfg.privacy.target_epsilon
    )
    short = load_config(
        repo_root / "configs" / "sinusoid-dp.yaml", ["federation.rounds=3", "eval.tasks=20", "eval.every=3"]
    )
    summary = run_centralized(short, tmp_path)
    assert summary["rounds_completed"] == 3 and 0 < summary["privacy"]["epsilon"] < plan.epsilon
