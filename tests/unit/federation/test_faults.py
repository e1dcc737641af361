"""fedmeta.federation.faults: each fault's reply, and hostile clients through the real round loop."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedmeta.aggregation import global_norm
from fedmeta.config import Config, load_config
from fedmeta.errors import ConfigError
from fedmeta.federation import FAULTS, ClientReply, HostileClients, InProcessTransport, RoundLoop, make_fault
from fedmeta.federation.faults import FaultContext
from fedmeta.outputs import read_metrics


def _reply(cid: int = 3, value: float = 1.0) -> ClientReply:
    return ClientReply(cid, {"w": torch.full((2, 2), value), "b": torch.full((2,), value)}, 5, {"loss": 1.0})


def _ctx(round_idx: int = 1, past=None) -> FaultContext:
    return FaultContext(round_idx, torch.Generator().manual_seed(round_idx), past or {})


def test_each_fault_changes_the_reply_as_documented() -> None:
    honest = _reply()
    assert FAULTS.names() == ("scaled", "sign_flip", "random", "nan", "stale", "claim_tasks")
    assert torch.equal(make_fault("scaled")(honest, _ctx()).update["w"], torch.full((2, 2), 100.0))
    assert torch.equal(make_fault("sign_flip")(honest, _ctx()).update["b"], torch.full((2,), -1.0))
    noisy = make_fault("random")(honest, _ctx())
    assert global_norm(noisy.update) == pytest.approx(10 * global_norm(honest.update))
    assert all(math.isnan(float(x)) for v in make_fault("nan")(honest, _ctx()).update.values() for x in v.view(-1))
    claim = make_fault("claim_tasks")(honest, _ctx())
    assert claim.num_tasks == 10**6 and claim.update is honest.update
    past = {1: {3: _reply(3, 7.0).update, 4: _reply(4, 8.0).update}, 2: {4: _reply(4, 9.0).update}}
    late = make_fault("stale", lag=10)
    assert late(honest, _ctx(5, past)) is honest  # nothing 10 rounds back yet: honest
    assert torch.equal(late(honest, _ctx(11, past)).update["w"], torch.full((2, 2), 7.0))  # its own
    assert torch.equal(late(honest, _ctx(12, past)).update["w"], torch.full((2, 2), 9.0))  # another's
    with pytest.raises(ConfigError, match="no fault 'nope'"):
        make_fault("nope")


@pytest.fixture(scope="module")
def cfg(repo_root: Path) -> Config:
    return load_config(
        repo_root / "configs" / "sinusoid.yaml",
        ["federation.clients_total=12", "federation.clients_per_round=4", "meta.tasks_per_client=2",
         "federation.rounds=2", "eval.tasks=10", "eval.every=2"],
    )  # fmt: skip


def test_hostile_replies_go_through_the_loops_validation(cfg: Config, tmp_path: Path) -> None:
    nan = HostileClients(InProcessTransport(), make_fault("nan"), count=2, seed=1)
    loop = RoundLoop(cfg, tmp_path / "nan")
    loop.run(nan)
    rows = [r for r in read_metrics(tmp_path / "nan" / "metrics.jsonl") if r["round"] > 0]
    assert [(r["replies"], r["rejected"]) for r in rows] == [(2, 2)] * 2  # NaN updates are refused
    assert nan.chosen == {r: nan.hostile_clients(r, loop.exp.sample_round(r)) for r in (1, 2)}
    assert all(len(set(v) & set(loop.exp.sample_round(r))) == 2 for r, v in nan.chosen.items())
    liar = HostileClients(InProcessTransport(), make_fault("claim_tasks"), count=1, seed=1)
    RoundLoop(cfg, tmp_path / "liar").run(liar)
    lied = [r["tasks"] for r in read_metrics(tmp_path / "liar" / "metrics.jsonl") if r["round"] > 0]
    assert lied == [4 * 2] * 2  # the claimed 10^6 is capped at meta.tasks_per_client
