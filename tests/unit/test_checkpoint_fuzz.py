"""Fuzzing checkpoint loading (hypothesis): any file gets a CheckpointError or resumes a run that can step.

Starting from a real checkpoint of a tiny run: random bytes, truncations and flipped bytes of
the file, and structural damage to what it holds (a key removed, or a value anywhere in the
nested state replaced by one of another type or shape). Loading it with ``load_checkpoint``,
resuming the round loop from it and taking an optimizer step either works or is refused with a
domain error naming the file, never a traceback.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import Config, load_config
from fedmeta.errors import CheckpointError, FedMetaError
from fedmeta.experiment import Experiment
from fedmeta.federation.loop import RoundLoop
from tests.unit.fuzzing import fuzz_settings

ROOT = Path(__file__).resolve().parents[2]
TINY = [
    "eval.tasks=4",
    "eval.every=1",
    "eval.steps=1",
    "model.hidden=[4]",
    "federation.clients_total=4",
    "federation.clients_per_round=2",
    "meta.tasks_per_client=2",
]


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Config, Experiment]]:
    """A one-round run's folder, and the two-round config (and experiment) that resumes it."""
    out = tmp_path_factory.mktemp("fuzz-ckpt") / "run"
    cfg = load_config(ROOT / "configs" / "sinusoid.yaml", [*TINY, "federation.rounds=2"])
    exp = Experiment(cfg)
    # the state a finished round leaves (moments and step counts included), without running one
    loop = RoundLoop(cfg, out, mode="centralized", experiment=exp, server_eval=True)
    loop.meta = loop.optimizer.step({k: torch.full_like(v, 0.1) for k, v in loop.meta.items()})
    loop.round = 1
    loop.checkpoint()
    yield out, cfg, exp


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path into a nested state (dicts and lists)."""
    found = [prefix] if prefix else []
    if isinstance(node, dict):
        for k, v in node.items():
            found += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _paths(v, (*prefix, i))
    return found


REPLACEMENTS = st.one_of(
    st.sampled_from(
        ["delete", None, 0, -1, 2**62, 1.5, float("nan"), "x", "fedmeta-checkpoint", [], {}, [1, 2], {"a": 1}]
    ),
    st.sampled_from(["tensor-shape", "tensor-nan", "tensor-int", "tensor-scalar"]),
)


def _replacement(choice: Any, old: Any) -> Any:
    if choice == "tensor-shape":
        return torch.zeros(3, 5)
    if choice == "tensor-nan":
        return (
            torch.full_like(old, float("nan"))
            if isinstance(old, torch.Tensor) and old.is_floating_point()
            else torch.tensor([float("nan")])
        )
    if choice == "tensor-int":
        return torch.ones(old.shape if isinstance(old, torch.Tensor) else (2,), dtype=torch.int64)
    if choice == "tensor-scalar":
        return torch.tensor(1.0)
    return choice


def _damage(state: dict[str, Any], path: tuple[Any, ...], choice: Any) -> None:
    node: Any = state
    for key in path[:-1]:
        node = node[key]
    last = path[-1]
    if not isinstance(node, (dict, list)):
        raise TypeError("an earlier change replaced this path's parent")
    if choice == "delete":
        del node[last]
    else:
        node[last] = _replacement(choice, node[last])


def _resume(folder: Path, cfg: Config, exp: Experiment) -> bool:
    """Load, resume and step: each may refuse with a domain error; nothing else may escape.

    Returns:
        Whether the run resumed (``False``: refused with a CheckpointError naming the file).
    """
    try:
        load_checkpoint(folder / "checkpoint.pt")
        loop = RoundLoop(cfg, folder, mode="centralized", resume=True, experiment=exp, server_eval=True)
    except FedMetaError as exc:
        assert "checkpoint" in str(exc)
        return False
    new = loop.optimizer.step({k: torch.ones_like(v) for k, v in loop.meta.items()})
    assert set(new) == set(loop.meta) and all(bool(torch.isfinite(v).all()) for v in new.values())
    return True


def _with_checkpoint(finished: tuple[Path, Config, Experiment], data: bytes) -> bool:
    out, cfg, exp = finished
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        shutil.copytree(out, folder)
        (folder / "checkpoint.pt").write_bytes(data)
        return _resume(folder, cfg, exp)


def test_the_intact_checkpoint_resumes(finished: tuple[Path, Config, Experiment]) -> None:
    assert _with_checkpoint(finished, (finished[0] / "checkpoint.pt").read_bytes())


@fuzz_settings(40)
@given(st.data())
def test_damaged_bytes_are_a_checkpoint_error_or_resume(
    finished: tuple[Path, Config, Experiment], data: st.DataObject
) -> None:
    original = (finished[0] / "checkpoint.pt").read_bytes()
    how = data.draw(st.sampled_from(["random", "truncate", "flip"]))
    if how == "random":
        damaged = data.draw(st.binary(max_size=256))
    elif how == "truncate":
        damaged = original[: data.draw(st.integers(0, len(original) - 1))]
    else:
        damaged = bytearray(original)
        for pos in data.draw(st.lists(st.integers(0, len(original) - 1), min_size=1, max_size=4)):
            damaged[pos] ^= data.draw(st.integers(1, 255))
        damaged = bytes(damaged)
    _with_checkpoint(finished, damaged)


@fuzz_settings(80)
@given(st.data())
def test_damaged_contents_are_a_checkpoint_error_or_resume(
    finished: tuple[Path, Config, Experiment], data: st.DataObject
) -> None:
    state = torch.load(finished[0] / "checkpoint.pt", weights_only=True)
    paths = _paths(state)
    for path in data.draw(st.lists(st.sampled_from(paths), min_size=1, max_size=3, unique=True)):
        choice = data.draw(REPLACEMENTS)
        with contextlib.suppress(KeyError, IndexError, TypeError):  # an earlier change removed this path's parent
            _damage(state, path, choice)
    buf = io.BytesIO()
    torch.save(state, buf)
    _with_checkpoint(finished, buf.getvalue())


# -- the crashes the fuzzing found, pinned ---------------------------------------------------------


def _damaged(finished: tuple[Path, Config, Experiment], change: Any) -> bytes:
    state = torch.load(finished[0] / "checkpoint.pt", weights_only=True)
    change(state)
    buf = io.BytesIO()
    torch.save(state, buf)
    return buf.getvalue()


def _first_moments(state: dict[str, Any]) -> dict[str, Any]:
    return next(iter(state["optimizer"]["state"].values()))


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda s: s.pop("round"), r"its round must be a non-negative integer, got None"),
        (lambda s: s.update(round="7"), r"its round must be a non-negative integer, got '7'"),
        (lambda s: s.update(version=torch.zeros(3, 5)), r"has format version 'Tensor'"),
        (lambda s: s.update(format=torch.zeros(2)), r"is not a fedmeta checkpoint"),
        (lambda s: s.update(optimizer=[1, 2]), r"entry 'optimizer' must be dict or null, got list"),
        (
            lambda s: s["meta_params"].update({next(iter(s["meta_params"])): torch.ones(2, dtype=torch.int64)}),
            r"has dtype torch.int64, not floating point",
        ),
        (lambda s: s["optimizer"]["param_groups"][0].pop("params"), r"optimizer state cannot be restored"),
        (lambda s: s["optimizer"]["param_groups"][0].update(params=None), r"optimizer state cannot be restored"),
        (lambda s: s["optimizer"].update(param_groups=[]), r"does not have 1 parameter group"),
        (lambda s: _first_moments(s).update(exp_avg=torch.zeros(3, 5)), r"'exp_avg' has shape \(3, 5\)"),
        (lambda s: _first_moments(s).update(step=torch.zeros(3, 5)), r"a step count is"),
        (lambda s: _first_moments(s).pop("exp_avg_sq"), r"a parameter's state has entries"),
        (
            lambda s: _first_moments(s).update(
                exp_avg_sq=torch.full_like(_first_moments(s)["exp_avg_sq"], float("nan"))
            ),
            r"'exp_avg_sq' is not a finite",
        ),
        (lambda s: s["extra"].update(totals=[1]), r"its 'totals' must map"),
        (lambda s: s["extra"].update(stages=["x"]), r"server-stage states must be a mapping"),
    ],
)
def test_damaged_entries_the_fuzzing_found_are_checkpoint_errors(
    finished: tuple[Path, Config, Experiment], change: Any, match: str
) -> None:
    out, cfg, exp = finished
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "run"
        shutil.copytree(out, folder)
        (folder / "checkpoint.pt").write_bytes(_damaged(finished, change))
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(folder / "checkpoint.pt")
            RoundLoop(cfg, folder, mode="centralized", resume=True, experiment=exp, server_eval=True)


def test_damaged_optimizer_flags_do_not_reach_the_step(finished: tuple[Path, Config, Experiment]) -> None:
    """The hyperparameters are the config's: a checkpoint's damaged group options are not taken."""
    for flag, value in (("capturable", True), ("foreach", True), ("differentiable", torch.zeros(2)), ("lr", "x")):
        data = _damaged(finished, lambda s, f=flag, v=value: s["optimizer"]["param_groups"][0].update({f: v}))
        assert _with_checkpoint(finished, data), flag
