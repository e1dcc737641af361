"""Checkpoints are atomic, tensor-only and checked before use."""

from __future__ import annotations

import contextlib
import pickle
from pathlib import Path

import pytest
import torch

from fedmeta.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedmeta.errors import CheckpointError


def _save(path: Path, **over) -> Path:
    kwargs = {
        "meta_params": {"w": torch.ones(2, 2)},
        "round_idx": 3,
        "config": {"seed": 0},
        "model": {"name": "mlp"},
        "task_kind": "regression",
    }
    kwargs.update(over)
    return save_checkpoint(path, **kwargs)


def test_round_trip(tmp_path: Path) -> None:
    p = _save(tmp_path / "c.pt", optimizer={"state": {}, "param_groups": []})
    state = load_checkpoint(p)
    assert state["round"] == 3 and torch.equal(state["meta_params"]["w"], torch.ones(2, 2))
    assert not list(tmp_path.glob(".c.pt.*")), "no temporary files are left behind"


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_code_carrying_pickle_is_refused(tmp_path: Path) -> None:
    p = tmp_path / "evil.pt"
    torch.save(
        {"format": "fedmeta-checkpoint", "version": 1, "meta_params": {"w": torch.ones(1)}, "x": _Evil()},
        p,
        pickle_module=pickle,
    )
    with pytest.raises(CheckpointError, match="evil.pt' is corrupt or not a safe tensor-only file"):
        load_checkpoint(p)


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (b"garbage", "is corrupt"),
        (None, "does not exist"),
    ],
)
def test_missing_or_corrupt(tmp_path: Path, content: bytes | None, match: str) -> None:
    p = tmp_path / "c.pt"
    if content is not None:
        p.write_bytes(content)
    with pytest.raises(CheckpointError, match=match):
        load_checkpoint(p)


def test_truncated_file_is_corrupt(tmp_path: Path) -> None:
    p = _save(tmp_path / "c.pt")
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(CheckpointError, match="is corrupt"):
        load_checkpoint(p)


def test_not_a_fedmeta_checkpoint(tmp_path: Path) -> None:
    p = tmp_path / "other.pt"
    torch.save({"state_dict": {"w": torch.ones(1)}}, p)
    with pytest.raises(CheckpointError, match="not a fedmeta checkpoint"):
        load_checkpoint(p)


def test_nan_parameters_refused(tmp_path: Path) -> None:
    p = _save(tmp_path / "c.pt", meta_params={"w": torch.tensor([float("nan")])})
    with pytest.raises(CheckpointError, match="'w' contains NaN"):
        load_checkpoint(p)


def test_compatibility_checks(tmp_path: Path) -> None:
    state = load_checkpoint(_save(tmp_path / "c.pt"))
    check_compatible(state, {"w": (2, 2)}, path="c.pt", task_kind="regression")
    with pytest.raises(CheckpointError, match="'w' has shape \\(2, 2\\), the model here needs \\(3, 2\\)"):
        check_compatible(state, {"w": (3, 2)}, path="c.pt")
    with pytest.raises(CheckpointError, match="different model"):
        check_compatible(state, {"v": (2, 2)}, path="c.pt")
    with pytest.raises(CheckpointError, match="trained on regression tasks.*classification"):
        check_compatible(state, {"w": (2, 2)}, path="c.pt", task_kind="classification")


def test_random_bytes_are_always_reported_as_corrupt(tmp_path: Path) -> None:
    """Fuzz: whatever garbage a file holds, loading it raises CheckpointError and nothing else."""
    import random

    rng = random.Random(0)
    good = _save(tmp_path / "good.pt").read_bytes()
    for i in range(150):
        p = tmp_path / f"f{i}.pt"
        if i % 2:
            data = bytearray(good)
            for _ in range(rng.randint(1, 20)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            p.write_bytes(bytes(data))
        else:
            p.write_bytes(bytes(rng.randrange(256) for _ in range(rng.randint(0, 400))))
        with contextlib.suppress(CheckpointError):
            load_checkpoint(p)
