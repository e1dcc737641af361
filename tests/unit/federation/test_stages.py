"""Server stages: the chain's order and state, the outer-lr schedules, resume with a schedule."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import Config, config_from_dict
from fedmeta.errors import CheckpointError, ConfigError
from fedmeta.federation.loop import ClientReply
from fedmeta.federation.stages import OuterSchedule, RoundState, build_stages, load_stage_states, stage_states
from fedmeta.optim import ServerOptimizer
from fedmeta.outputs import read_metrics


def _cfg(**meta: object) -> Config:
    return config_from_dict(
        {
            "federation": {"rounds": 6, "clients_total": 6, "clients_per_round": 3},
            "meta": {"outer_optimizer": "sgd", "outer_lr": 0.1, **meta},
            "eval": {"tasks": 10, "every": 6},
        }
    )


def test_schedules_follow_their_formulas() -> None:
    # t = (r - 1) / rounds: final_lr is where the schedule goes after the last round (torch's convention),
    # so the last round still steps when final_lr is 0
    lin = OuterSchedule("linear", 1.0, 5, final_lr=0.2)
    assert [lin.lr_at(r) for r in range(1, 6)] == pytest.approx([1.0, 0.84, 0.68, 0.52, 0.36])
    cos = OuterSchedule("cosine", 1.0, 3, final_lr=0.0)
    assert [cos.lr_at(r) for r in (1, 2, 3)] == pytest.approx([1.0, 0.75, 0.25], abs=1e-12)
    assert OuterSchedule("linear", 1.0, 1, final_lr=0.0).lr_at(1) == 1.0  # a one-round run trains
    step = OuterSchedule("step", 1.0, 10, milestones=(3, 6), gamma=0.5)
    assert [step.lr_at(r) for r in range(1, 9)] == [1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert OuterSchedule("constant", 0.3, 10).lr_at(7) == 0.3
    assert OuterSchedule("linear", 1.0, 5, final_lr=0.2).lr_at(50) == pytest.approx(0.2)  # past the end: last value


def test_schedule_keys_are_validated_by_name() -> None:
    with pytest.raises(ConfigError, match="meta.outer_schedule"):
        _cfg(outer_schedule="exponential")
    with pytest.raises(ConfigError, match="meta.outer_milestones"):
        _cfg(outer_schedule="step")
    with pytest.raises(ConfigError, match="meta.outer_milestones"):
        _cfg(outer_schedule="step", outer_milestones=[4, 2])
    with pytest.raises(ConfigError, match="meta.outer_lr_final"):
        _cfg(outer_schedule="linear", outer_lr_final=0.5)
    with pytest.raises(ConfigError, match="meta.outer_gamma"):
        _cfg(outer_schedule="step", outer_milestones=[2], outer_gamma=0.0)


class _Policy:
    """A stand-in aggregation: the plain mean of the updates (enough to see the chain's order)."""

    def aggregate(self, round_idx, updates, *, reference, reports=None):
        return {k: torch.stack([u[k] for u in updates]).mean(0) for k in reference}


def test_chain_runs_reply_stages_then_aggregation_then_aggregate_stages_then_optimizer() -> None:
    seen: list[str] = []
    cfg = _cfg()
    meta = {"w": torch.zeros(2)}
    opt = ServerOptimizer(meta, name="sgd", lr=0.5)  # the stage steps at the config's rate (0.1) every round

    def double(r: int, replies: list[ClientReply]) -> list[ClientReply]:
        seen.append("replies")
        return [ClientReply(rep.client_id, {"w": rep.update["w"] * 2}, rep.num_tasks, rep.metrics) for rep in replies]

    def shift(r: int, aggregate: dict, replies: list[ClientReply]) -> dict:
        seen.append("aggregate")
        return {"w": aggregate["w"] + 1.0}

    stages = build_stages(cfg, _Policy(), opt, update_transforms=[double], aggregate_transforms=[shift])  # type: ignore[arg-type]
    assert [s.name for s in stages] == ["replies-0", "aggregate", "update-0", "optimizer"]
    replies = [
        ClientReply(0, {"w": torch.tensor([1.0, 0.0])}, 1, {}),
        ClientReply(1, {"w": torch.tensor([0.0, 1.0])}, 1, {}),
    ]
    state = RoundState(1, meta, replies)
    for stage in stages:
        stage(state)
    assert seen == ["replies", "aggregate"]
    # mean of doubled updates = [1, 1]; +1 = [2, 2]; SGD at meta.outer_lr 0.1 from 0: [-0.2, -0.2]
    assert torch.equal(state.aggregate["w"], torch.tensor([2.0, 2.0]))
    torch.testing.assert_close(state.meta["w"], torch.tensor([-0.2, -0.2]))
    assert state.info["update_norm"] == pytest.approx(math.sqrt(8))


class _Counting:
    """An aggregate transform with state of its own (as a constraint generator would keep)."""

    stage_name = "counting"

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, r: int, aggregate: dict, replies: list[ClientReply]) -> dict:
        self.calls += 1
        return aggregate

    def state_dict(self) -> dict:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict) -> None:
        self.calls = int(state["calls"])


def test_a_transform_with_state_has_it_saved_under_its_name_and_restored() -> None:
    opt = ServerOptimizer({"w": torch.zeros(1)}, name="sgd", lr=0.1)
    counting = _Counting()
    stages = build_stages(_cfg(), _Policy(), opt, aggregate_transforms=[counting])  # type: ignore[arg-type]
    state = RoundState(1, {"w": torch.zeros(1)}, [ClientReply(0, {"w": torch.ones(1)}, 1, {})])
    for stage in stages:
        stage(state)
    saved = stage_states(stages, skip=("optimizer",))
    assert saved == {"counting": {"calls": 1}}
    fresh = _Counting()
    load_stage_states(build_stages(_cfg(), _Policy(), opt, aggregate_transforms=[fresh]), saved, path="c.pt")  # type: ignore[arg-type]
    assert fresh.calls == 1
    with pytest.raises(CheckpointError, match="'counting' keeps no state"):
        plain = build_stages(_cfg(), _Policy(), opt, aggregate_transforms=[lambda r, a, reps: a])  # type: ignore[arg-type]
        plain[1].name = "counting"  # type: ignore[misc]
        load_stage_states(plain, saved, path="c.pt")


def test_stage_states_round_trip_and_unknown_stages_are_refused() -> None:
    cfg = _cfg()
    opt = ServerOptimizer({"w": torch.zeros(1)}, name="sgd", lr=0.1)
    stages = build_stages(cfg, _Policy(), opt)  # type: ignore[arg-type]
    assert stage_states(stages, skip=("optimizer",)) == {}
    with pytest.raises(CheckpointError, match="server stages \\['clip'\\]"):
        load_stage_states(stages, {"clip": {"norm": 1.0}}, path="ckpt.pt")


def test_step_schedule_applies_per_round_and_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    cfg = _cfg(outer_schedule="step", outer_milestones=[2, 4], outer_gamma=0.5)
    full = run_centralized(cfg, tmp_path / "full")
    rows = [r for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if r["round"] > 0]
    assert [r["outer_lr"] for r in rows] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025, 0.025])
    part = _cfg(outer_schedule="step", outer_milestones=[2, 4], outer_gamma=0.5)
    with pytest.raises(_Stop):
        run_centralized(part, tmp_path / "cut", progress=_stop_after(3))
    assert load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["round"] == 3
    resumed = run_centralized(part, tmp_path / "cut", resume=True)
    a = load_checkpoint(tmp_path / "full" / "checkpoint.pt")["meta_params"]
    b = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")["meta_params"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["final"]["post_adapt_loss"] == full["final"]["post_adapt_loss"]


def test_constant_schedule_leaves_no_trace_in_the_rows(tmp_path: Path) -> None:
    run_centralized(_cfg(), tmp_path)
    assert all("outer_lr" not in r for r in read_metrics(tmp_path / "metrics.jsonl"))


class _Stop(Exception):
    pass


def _stop_after(round_idx: int):
    def progress(r: int, row: dict) -> None:
        if r == round_idx:
            raise _Stop(r)

    return progress

