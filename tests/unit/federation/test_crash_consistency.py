"""A crash at any point of a round loses no metrics row and duplicates none; a failed round leaves nothing ahead.

A crash is simulated by copying the output folder exactly as it is at the chosen point (what a
SIGKILL there would leave on disk) and stopping the run; the copy is then resumed, as an operator
would resume it, and its rows are compared with an uninterrupted run's.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

import fedmeta.checkpoint as checkpoint_module
import fedmeta.federation.loop as loop_module
from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import Config, load_config
from fedmeta.errors import CheckpointError
from fedmeta.federation import RoundLoop
from fedmeta.outputs import RunRecorder, read_metrics

CRASH_ROUND = 2


class _Crash(BaseException):
    """Stands for the process dying: nothing of the run may catch it."""


@pytest.fixture(scope="module")
def cfg(repo_root: Path) -> Config:
    return load_config(
        repo_root / "configs" / "sinusoid.yaml",
        ["federation.clients_total=8", "federation.clients_per_round=3", "meta.tasks_per_client=2",
         "federation.rounds=3", "eval.tasks=8", "eval.every=1", "model.hidden=[16,16]"],
    )  # fmt: skip


@pytest.fixture(scope="module")
def reference(cfg: Config, tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("uninterrupted")
    run_centralized(cfg, out)
    return _comparable(read_metrics(out / "metrics.jsonl"))


def _comparable(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in r.items() if k not in ("timing", "seconds")} for r in rows]


def _freeze(out: Path, crashed: Path) -> None:
    """What a SIGKILL now would leave on disk."""
    shutil.copytree(out, crashed)


def _inject(point: str, monkeypatch: pytest.MonkeyPatch, out: Path, crashed: Path) -> None:
    """Make the run die at ``point`` of round ``CRASH_ROUND``."""
    log_round = RunRecorder.log_round
    save = loop_module.save_checkpoint
    replace = checkpoint_module.os.replace

    def logging_row(self: RunRecorder, row: dict[str, Any]) -> None:
        if row.get("round") == CRASH_ROUND and "train" in row:
            if point == "torn-row":  # the row is half written when the process dies
                line = json.dumps(row) + "\n"
                with self.metrics_path.open("a", encoding="utf-8") as fh:
                    fh.write(line[: len(line) // 2])
                _freeze(out, crashed)
                raise _Crash(point)
            log_round(self, row)
            if point == "after-row":
                _freeze(out, crashed)
                raise _Crash(point)
            return
        log_round(self, row)

    def saving(path: Any, **kwargs: Any) -> Path:
        written = save(path, **kwargs)
        if point == "after-checkpoint" and kwargs["round_idx"] == CRASH_ROUND:
            _freeze(out, crashed)
            raise _Crash(point)
        return written

    def replacing(src: Any, dst: Any) -> None:
        # the new checkpoint of the crash round is written, not yet renamed
        is_checkpoint = point == "during-checkpoint" and Path(dst).name == "checkpoint.pt"
        if is_checkpoint and load_checkpoint(src)["round"] == CRASH_ROUND:
            _freeze(out, crashed)
            raise _Crash(point)
        replace(src, dst)

    monkeypatch.setattr(RunRecorder, "log_round", logging_row)
    monkeypatch.setattr(loop_module, "save_checkpoint", saving)
    monkeypatch.setattr(checkpoint_module.os, "replace", replacing)


@pytest.mark.parametrize("point", ["torn-row", "after-row", "during-checkpoint", "after-checkpoint"])
def test_a_crash_at_any_point_of_a_round_loses_no_row_and_duplicates_none(
    point: str, cfg: Config, reference: list[dict[str, Any]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out, crashed = tmp_path / "run", tmp_path / "crashed"
    with monkeypatch.context() as patch:
        _inject(point, patch, out, crashed)
        with pytest.raises(_Crash):
            run_centralized(cfg, out)
    resumed_at = load_checkpoint(crashed / "checkpoint.pt")["round"]
    assert resumed_at == (CRASH_ROUND if point == "after-checkpoint" else CRASH_ROUND - 1)
    run_centralized(cfg, crashed, resume=True)
    rows = _comparable(read_metrics(crashed / "metrics.jsonl"))
    assert [r["round"] for r in rows] == [r["round"] for r in reference] == [0, 1, 2, 3]
    assert rows == reference  # the rerun round's row equals the uninterrupted one: nothing lost, nothing twice


def test_a_resume_refuses_a_metrics_file_with_a_corrupt_row_before_the_last(tmp_path: Path) -> None:
    (tmp_path / "metrics.jsonl").write_text('{"round": 0}\nnot json\n{"round": 1}\n', encoding="utf-8")
    with pytest.raises(CheckpointError, match=r"metrics.jsonl', line 2, is not a JSON row"):
        RunRecorder(tmp_path, resume_round=1)


def test_the_checkpoint_folder_is_fsynced_after_the_rename(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[Path] = []
    fsync_dir = checkpoint_module.fsync_dir
    monkeypatch.setattr(checkpoint_module, "fsync_dir", lambda p: (synced.append(Path(p)), fsync_dir(p))[1])
    checkpoint_module.atomic_write_bytes(tmp_path / "a" / "checkpoint.pt", b"x")
    assert synced == [tmp_path / "a"] and (tmp_path / "a" / "checkpoint.pt").read_bytes() == b"x"


def test_a_round_that_fails_after_the_optimizer_step_leaves_nothing_ahead_of_the_checkpoint(
    cfg: Config, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server evaluation runs after the optimizer step; when it fails, summary.json, the rows and
    the loop's own state must describe the checkpoint's round, not the half-done one."""
    evaluate = RoundLoop.evaluate
    calls = {"n": 0}

    def failing(self: RoundLoop) -> dict[str, Any]:
        if self.round == CRASH_ROUND:  # set by the round being completed, after the optimizer step
            calls["n"] += 1
            if calls["n"] == 1:
                raise RuntimeError("evaluation failed")
        return evaluate(self)

    monkeypatch.setattr(RoundLoop, "evaluate", failing)
    loop = RoundLoop(cfg, tmp_path, mode="centralized", server_eval=True)
    from fedmeta.federation.transport import InProcessTransport

    with pytest.raises(RuntimeError, match="evaluation failed"):
        loop.run(InProcessTransport())
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert state["round"] == CRASH_ROUND - 1 == summary["rounds_completed"] == loop.round
    assert all(torch.equal(state["meta_params"][k], loop.meta[k]) for k in loop.meta)
    assert loop.optimizer.state_dict()["state"][0]["step"] == state["optimizer"]["state"][0]["step"]
    assert all(torch.equal(loop.optimizer.params[k], loop.meta[k]) for k in loop.meta)
    assert [r["round"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [0, 1]
    assert summary["final"] == read_metrics(tmp_path / "metrics.jsonl")[-1]["eval"]
