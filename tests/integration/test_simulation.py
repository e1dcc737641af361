"""Real Flower simulations (Ray backend) of the fedmeta ClientApp and ServerApp."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import load_config
from fedmeta.errors import InconsistentReplies
from fedmeta.sampling import sample_clients
from tests.integration.faults import Faults

pytestmark = pytest.mark.slow


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _fedmeta(*args: str) -> None:
    """Run the fedmeta console script (a real process, as a user would)."""
    cmd = [sys.executable, "-m", "fedmeta.cli", *args, "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_simulate_matches_centralized(repo_root: Path, tmp_path: Path) -> None:
    """One task per client, no privacy, 30 rounds of 5 clients out of 50: same held-out metrics."""
    config = str(repo_root / "configs" / "sinusoid.yaml")
    common = [
        "--set", "federation.clients_total=50", "federation.clients_per_round=5", "federation.rounds=30",
        "meta.tasks_per_client=1", "privacy.mode=none", "eval.tasks=200", "eval.every=30", "eval.steps=5",
    ]
    _fedmeta("simulate", config, "--out", str(tmp_path / "sim"), *common)
    _fedmeta("centralized", config, "--out", str(tmp_path / "cen"), *common)
    sim = json.loads((tmp_path / "sim" / "summary.json").read_text())
    cen = json.loads((tmp_path / "cen" / "summary.json").read_text())
    assert sim["mode"] == "simulation" and sim["rounds_completed"] == 30
    for key in ("pre_adapt_loss", "post_adapt_loss_1step", "post_adapt_loss"):
        assert abs(sim["final"][key] - cen["final"][key]) <= 1e-3 * abs(cen["final"][key]), key
    # the same cohorts, the same tasks, the same training metrics round by round
    sim_rows = {r["round"]: r for r in _rows(tmp_path / "sim") if "train" in r}
    cen_rows = {r["round"]: r for r in _rows(tmp_path / "cen") if "train" in r}
    assert sorted(sim_rows) == sorted(cen_rows) == list(range(1, 31))
    for r in (1, 15, 30):
        assert sim_rows[r]["train"]["query_loss_pre"] == pytest.approx(cen_rows[r]["train"]["query_loss_pre"], rel=1e-3)
        assert sim_rows[r]["replies"] == 5 and sim_rows[r]["bytes"]["up_per_client"] > 7000
    a = load_checkpoint(tmp_path / "sim" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cen" / "checkpoint.pt")
    assert a["round"] == b["round"] == 30
    for k, v in b["meta_params"].items():
        torch.testing.assert_close(a["meta_params"][k], v, rtol=1e-3, atol=1e-4)


def _pick(seed: int, rounds: int, total: int, per_round: int) -> tuple[list[list[int]], list[int]]:
    cohorts = [sample_clients(seed, r, total, per_round) for r in range(1, rounds + 1)]
    counts = {c: sum(c in co for co in cohorts) for c in range(total)}
    often = sorted(counts, key=lambda c: (-counts[c], c))
    return cohorts, often


def test_simulation_learns_and_survives_faulty_clients(
    repo_root: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """One real simulation: it learns sinusoid while one client always raises, one times out
    once, and one sends NaN (rejected, never aggregated); enough valid replies arrive every
    round, so failed clients are skipped rather than retried. The timeout leaves room for a
    loaded machine (the first round also warms the actors: at a load of ~25 on two cores one
    actor served round 1 alone and a healthy client missed 30 s and even 90 s). The slow
    client holds its reply until the server has closed its round, so the reply comes after the
    timeout by construction; the server's deadline for that round (the transport's injectable
    ``Deadline``) fires as soon as that held client is the only one missing, instead of after
    the full timeout: an event, not a wait for the clock. Every other exchange keeps the
    default deadline (the timeout)."""
    from fedmeta.flower.simulation import simulate
    from fedmeta.flower.transport import Waiting, timeout_deadline

    rounds, total, per_round = 25, 20, 10
    cfg = load_config(
        repo_root / "configs" / "sinusoid.yaml",
        [
            f"federation.clients_total={total}",
            f"federation.clients_per_round={per_round}",
            f"federation.rounds={rounds}",
            "federation.round_timeout=120",
            "federation.max_retries=1",
            "federation.min_replies=5",
            "simulation.pool=false",  # the faults act per client: one node per client
            "meta.tasks_per_client=10",
            "meta.outer_lr=0.03",
            "eval.tasks=200",
            "eval.every=25",
            "eval.steps=5",
        ],
    )
    cohorts, often = _pick(cfg.seed, rounds, total, per_round)
    raiser, nan_client, slow = often[0], often[1], often[2]
    slow_round = next(r for r in range(2, rounds + 1) if slow in cohorts[r - 1])
    faults = Faults(
        raise_always=(raiser,), nan_reply=(nan_client,), slow_first_try=((slow, slow_round),),
        marker_dir=str(tmp_path),
    )

    def held_client_alone_missing(waiting: Waiting) -> bool:
        if waiting.kind == "train" and waiting.round_idx == slow_round:
            return waiting.pending_clients == {slow} and faults.holding(slow, slow_round)
        return timeout_deadline(waiting)

    with caplog.at_level("WARNING", logger="fedmeta"):
        # a round's metrics row is written once the server has closed it: held replies go then
        summary = simulate(
            cfg, tmp_path / "out", client_mods=[faults], progress=lambda rnd, row: faults.release(rnd),
            deadline=held_client_alone_missing,
        )  # fmt: skip

    assert summary["rounds_completed"] == rounds
    rows = {r["round"]: r for r in _rows(tmp_path / "out")}
    for r in range(1, rounds + 1):
        cohort = cohorts[r - 1]
        row = rows[r]
        assert row["clients"] == per_round
        assert row["failed"] == (raiser in cohort) + (r == slow_round), r
        assert row["rejected"] == (nan_client in cohort), r
        assert row["replies"] == per_round - row["failed"] - row["rejected"], r
        assert row["retries"] == 0
    # the slow client's round ended without it, on the round timeout (not an error of its own)
    timed_out = [r.getMessage() for r in caplog.records if "no reply within federation.round_timeout" in r.getMessage()]
    timeout = cfg.federation.round_timeout
    assert timed_out == [
        f"round {slow_round}: client {slow} failed: no reply within federation.round_timeout={timeout:g}s"
    ]
    totals = summary["federation"]["totals"]
    assert totals["rejected"] == sum(nan_client in c for c in cohorts) > 0
    assert totals["failed"] == sum(raiser in c for c in cohorts) + 1
    # it learned: held-out loss after adaptation well below where it started
    assert rows[rounds]["eval"]["post_adapt_loss"] < 0.75 * rows[0]["eval"]["post_adapt_loss"]
    assert all(
        torch.isfinite(v).all() for v in load_checkpoint(tmp_path / "out" / "checkpoint.pt")["meta_params"].values()
    )


def test_too_few_replies_stop_cleanly_and_the_run_resumes(repo_root: Path, tmp_path: Path) -> None:
    """Every client fails once in round 1 (retried: the round completes) and for good in
    round 3: the run stops with InconsistentReplies and the checkpoint of round 2; resumed, it
    finishes with the centralized reference's result. The run uses Meta-SGD (learned rates
    travel with the meta-parameters) and several local meta-steps on local meta-batches
    (FedMeta-style pseudo-gradients), so the equivalence covers those paths too."""
    from fedmeta.centralized import run_centralized
    from fedmeta.flower.simulation import simulate

    cfg = load_config(
        repo_root / "configs" / "sinusoid.yaml",
        [
            "federation.clients_total=12", "federation.clients_per_round=4", "federation.rounds=5",
            "federation.max_retries=1", "federation.min_replies=4", "meta.algorithm=metasgd", "meta.tasks_per_client=3",
            "meta.local_steps=2", "meta.local_lr=0.01", "meta.outer_lr=0.01", "eval.tasks=100", "eval.every=2",
        ],
    )
    out = tmp_path / "sim"
    faults = Faults(fail_from_round=3, fail_first_try_round=1, marker_dir=str(tmp_path))
    with pytest.raises(InconsistentReplies, match="round 3: only 0 valid replies"):
        simulate(cfg, out, client_mods=[faults])
    assert load_checkpoint(out / "checkpoint.pt")["round"] == 2
    first = _rows(out)[1]
    assert (first["round"], first["retries"], first["replies"], first["failed"]) == (1, 1, 4, 0)
    summary = simulate(cfg, out, resume=True)
    assert summary["rounds_completed"] == 5
    rows = [r for r in _rows(out) if "train" in r]
    assert [r["round"] for r in rows] == [1, 2, 3, 4, 5]
    assert all(r["tasks"] == 4 * 3 * 2 for r in rows)
    reference = run_centralized(cfg, tmp_path / "cen")
    for key in ("pre_adapt_loss", "post_adapt_loss"):
        assert summary["final"][key] == pytest.approx(reference["final"][key], rel=1e-3)
    a = load_checkpoint(out / "checkpoint.pt")["meta_params"]
    b = load_checkpoint(tmp_path / "cen" / "checkpoint.pt")["meta_params"]
    assert any(k.startswith("lr.") for k in a)
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=1e-3, atol=1e-5)


def test_simulation_learns_glyphs(repo_root: Path, tmp_path: Path) -> None:
    """A real simulation of Conv-4 MAML on glyphs 5-way 1-shot improves held-out accuracy."""
    from fedmeta.flower.simulation import simulate

    cfg = load_config(
        repo_root / "configs" / "glyphs.yaml",
        ["federation.rounds=20", "meta.outer_lr=0.003", "eval.tasks=100", "eval.every=20"],
    )
    summary = simulate(cfg, tmp_path / "out")
    rows = {r["round"]: r for r in _rows(tmp_path / "out")}
    before, after = rows[0]["eval"], rows[20]["eval"]
    assert summary["rounds_completed"] == 20 and all(
        rows[r]["replies"] == cfg.federation.clients_per_round for r in range(1, 21)
    )
    # the same 100 held-out episodes before and after: a paired comparison
    assert after["post_adapt_accuracy"] >= before["post_adapt_accuracy"] + 0.05
    assert after["post_adapt_loss"] < before["post_adapt_loss"]
    assert summary["final"]["post_adapt_accuracy"] == after["post_adapt_accuracy"]
