"""The federated server under DP without Flower's transport: RoundLoop fed by the client code.

Replies come from :func:`fedmeta.privacy.client_update.private_round`, exactly what the Flower
``ClientApp`` runs; the real simulations are in ``tests/integration/test_privacy_simulation.py``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.errors import BudgetExhausted
from fedmeta.federation import ClientReply, RoundLog, RoundLoop
from fedmeta.outputs import read_metrics
from fedmeta.privacy.accountant import epsilon_for
from fedmeta.privacy.client_update import private_round
from fedmeta.privacy.clipping import gaussian_noise
from fedmeta.privacy.facade import CLIP_NORM_KEY, ServerPrivacy
from fedmeta.privacy.randomness import privacy_generator
from tests.privacy_helpers import dp_config


def _play_round(server: RoundLoop, states: dict[int, Any]) -> dict[str, Any]:
    """One round as the Flower apps play it: instructions out, private_round on each client, replies in."""
    book = server.begin_round()
    for cid in book.sampled:
        config = server.instructions(book.round_idx, cid)
        update, metrics, state = private_round(
            server.exp, server.meta, book.round_idx, cid, state=states.get(cid), clip_norm=config.get(CLIP_NORM_KEY)
        )
        states[cid] = state
        assert server.accept(book, ClientReply(cid, update.gradient, update.num_tasks, metrics))
    return server.complete_round(book)


def test_required_replies_scale_with_the_cohort_actually_drawn(tmp_path: Path) -> None:
    server = RoundLoop(dp_config("client-central", total=40, per_round=10), tmp_path)
    assert server.cfg.min_replies == 5
    need = {n: server.required_replies(RoundLog(1, list(range(n)))) for n in (0, 1, 3, 10, 15)}
    assert need == {0: 0, 1: 1, 3: 2, 10: 5, 15: 8}


@pytest.mark.parametrize("mode", ["client-central", "client-local", "task"])
def test_meta_server_releases_what_the_centralized_reference_releases(mode: str, tmp_path: Path) -> None:
    cfg = dp_config(mode, rounds=4)
    server = RoundLoop(cfg, tmp_path / "fed")
    server.start()
    states: dict[int, Any] = {}
    while not server.finished:
        row = _play_round(server, states)
        assert row["train"] == {}  # neither training metrics nor privacy.* scalars are averaged in
    summary = server.finish()
    reference = run_centralized(cfg, tmp_path / "cen")
    assert summary["privacy"]["epsilon"] == pytest.approx(reference["privacy"]["epsilon"], rel=1e-12)
    a = load_checkpoint(tmp_path / "fed" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "cen" / "checkpoint.pt")
    assert a["accountant"] == b["accountant"]
    for k, v in b["meta_params"].items():
        torch.testing.assert_close(a["meta_params"][k], v, rtol=1e-4, atol=1e-6)
    fed_rows = [r for r in read_metrics(tmp_path / "fed" / "metrics.jsonl") if r["round"] > 0]
    cen_rows = [r for r in read_metrics(tmp_path / "cen" / "metrics.jsonl") if r["round"] > 0]
    assert [r["privacy"]["epsilon"] for r in fed_rows] == pytest.approx(
        [r["privacy"]["epsilon"] for r in cen_rows], rel=1e-12
    )


def test_an_empty_poisson_cohort_is_a_round_that_releases_pure_noise(tmp_path: Path) -> None:
    # q = 1/40: about a third of the rounds draw nobody (which rounds is fixed by the noise seed)
    cfg = dp_config("client-central", total=40, per_round=1, rounds=12, noise_multiplier=1.5)
    probe = ServerPrivacy(cfg)
    empty = next(r for r in range(1, 13) if not probe.sample_clients(r))
    server = RoundLoop(cfg, tmp_path)
    states: dict[int, Any] = {}
    for _ in range(empty - 1):
        _play_round(server, states)
    before = server.meta
    row = _play_round(server, states)
    assert (row["round"], row["clients"], row["replies"]) == (empty, 0, 0)
    # SGD with lr 0.05 on N(0, (z C)^2) / E[n], the noise drawn from the round's generator
    noise = gaussian_noise(before, 1.5 * 0.5, privacy_generator(7, "noise", empty))
    for k in before:
        torch.testing.assert_close(server.meta[k], before[k] - 0.05 * noise[k] / 1.0, rtol=1e-5, atol=1e-7)
    assert row["privacy"]["steps"] == empty
    assert row["privacy"]["epsilon"] == pytest.approx(
        epsilon_for(noise_multiplier=1.5, sample_rate=1 / 40, steps=empty, delta=1e-5), rel=1e-6
    )


def test_meta_server_stops_cleanly_at_the_budget_and_refuses_a_spent_one(tmp_path: Path) -> None:
    cfg = dp_config("client-local", rounds=30, noise_multiplier=6.0, target_epsilon=4.0, on_budget="stop")
    server = RoundLoop(cfg, tmp_path / "stop")
    assert 0 < server.rounds_limit < 30
    states: dict[int, Any] = {}
    while not server.finished:
        _play_round(server, states)
    summary = server.finish()
    assert summary["rounds_completed"] == server.rounds_limit and summary["privacy"]["stopped_by_budget"]
    assert summary["privacy"]["epsilon"] <= 4.0
    assert load_checkpoint(tmp_path / "stop" / "checkpoint.pt")["round"] == server.rounds_limit
    assert "eval" in read_metrics(tmp_path / "stop" / "metrics.jsonl")[-1]
    # every client's own accountant agrees with the server's mirror of it
    for cid, state in states.items():
        assert sum(state["steps"]) == server.policy.client_accountants[cid].steps  # type: ignore[attr-defined]
    refused = dp_config("client-local", rounds=30, noise_multiplier=6.0, target_epsilon=4.0)
    with pytest.raises(BudgetExhausted, match=f"only {server.rounds_limit} rounds fit"):
        RoundLoop(refused, tmp_path / "refused")
    assert not (tmp_path / "refused" / "metrics.jsonl").exists()
    assert math.isfinite(summary["privacy"]["epsilon"])
