"""Checkpoints: written atomically, read without executing code, checked for compatibility.

A checkpoint is a ``torch.save`` of plain containers and tensors only, so it loads with
``torch.load(..., weights_only=True)``: a crafted file cannot run code. It carries the
meta-parameters, the server optimizer state, the privacy accountant state, the round, and the
config it was trained with.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from fedmeta.errors import CheckpointError
from fedmeta.types import Params, model_part

__all__ = [
    "save_checkpoint",
    "load_checkpoint",
    "check_compatible",
    "file_sha256",
    "atomic_write_bytes",
    "fsync_dir",
    "FORMAT",
    "VERSION",
]

FORMAT = "fedmeta-checkpoint"
VERSION = 1


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks: a checkpoint's fingerprint in reports and records."""
    h = hashlib.sha256()
    with Path(path).open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    """``fsync`` a directory, so that a rename or a new file in it survives a power loss.

    A no-op where directories cannot be opened for it (Windows).

    Args:
        path: the directory.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the rename is then as durable as they allow
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` durably and atomically: never half-written, and kept after a crash.

    The data goes to a temporary file in the same directory, which is flushed and ``fsync``-ed,
    then renamed over ``path`` with ``os.replace``; the directory is ``fsync``-ed last, so the
    rename itself is on disk when this returns.

    Args:
        path: destination file (its directory is created if needed).
        data: the whole content.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_checkpoint(
    path: str | Path,
    *,
    meta_params: Params,
    round_idx: int,
    config: dict[str, Any],
    model: dict[str, Any],
    task_kind: str,
    optimizer: dict[str, Any] | None = None,
    accountant: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Atomically write a checkpoint to ``path``.

    Args:
        path: destination file.
        meta_params: the meta-parameters (Meta-SGD rates included).
        round_idx: the last completed round.
        config: the run config as plain dicts (:func:`fedmeta.config.to_dict`).
        model: the model description (:meth:`FunctionalModel.describe`).
        task_kind: ``"regression"`` or ``"classification"``.
        optimizer: server optimizer state.
        accountant: privacy accountant state.
        extra: anything else that must survive a restart (plain containers and tensors).
    """
    import io

    state = {
        "format": FORMAT,
        "version": VERSION,
        "round": int(round_idx),
        "meta_params": {k: v.detach().cpu().clone() for k, v in meta_params.items()},
        "optimizer": optimizer,
        "accountant": accountant,
        "config": config,
        "model": model,
        "task_kind": task_kind,
        "extra": extra or {},
    }
    buf = io.BytesIO()
    torch.save(state, buf)
    out = Path(path)
    atomic_write_bytes(out, buf.getvalue())
    return out


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint safely.

    Raises:
        CheckpointError: if the file is missing, unreadable, corrupt, not a fedmeta checkpoint,
            or of an unsupported version.
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"checkpoint '{p}' does not exist or is not a file")
    try:
        state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to parse a foreign file means "corrupt"
        # torch.load raises UnpicklingError, RuntimeError, EOFError, BadZipFile, but also KeyError or
        # IndexError on some random byte strings: none of them may escape as a traceback.
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint '{p}' is corrupt or not a safe tensor-only file: {first}") from exc
    # compared only once known to be plain values: a tensor here would make `!=` ambiguous
    if not isinstance(state, dict) or not isinstance(state.get("format"), str) or state["format"] != FORMAT:
        raise CheckpointError(f"checkpoint '{p}' is not a fedmeta checkpoint")
    version = state.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or version != VERSION:
        shown = version if isinstance(version, (int, str, type(None))) else type(version).__name__
        raise CheckpointError(f"checkpoint '{p}' has format version {shown!r}; this fedmeta reads version {VERSION}")
    params = state.get("meta_params")
    if (
        not isinstance(params, dict)
        or not params
        or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in params.items())
    ):
        raise CheckpointError(f"checkpoint '{p}' has no meta-parameters")
    for k, v in params.items():
        if not v.is_floating_point():
            raise CheckpointError(f"checkpoint '{p}': meta-parameter '{k}' has dtype {v.dtype}, not floating point")
        if not bool(torch.isfinite(v).all()):
            raise CheckpointError(f"checkpoint '{p}': meta-parameter '{k}' contains NaN or Inf")
    _check_entries(state, p)
    return state


#: what each entry of a checkpoint must be (beyond format, version and meta_params)
_ENTRY_TYPES: dict[str, tuple[type, ...]] = {
    "optimizer": (dict, type(None)),
    "accountant": (dict, type(None)),
    "config": (dict,),
    "model": (dict, type(None)),
    "task_kind": (str, type(None)),
    "extra": (dict, type(None)),
}


def _check_entries(state: dict[str, Any], path: Path) -> None:
    """Refuse a checkpoint whose round or entries have the wrong type (a damaged or foreign file)."""
    rnd = state.get("round")
    if not isinstance(rnd, int) or isinstance(rnd, bool) or rnd < 0:
        shown = rnd if isinstance(rnd, (int, float, str, type(None))) else type(rnd).__name__
        raise CheckpointError(f"checkpoint '{path}': its round must be a non-negative integer, got {shown!r}")
    for key, allowed in _ENTRY_TYPES.items():
        if not isinstance(state.get(key), allowed):
            want = " or ".join("null" if t is type(None) else t.__name__ for t in allowed)
            raise CheckpointError(
                f"checkpoint '{path}': entry '{key}' must be {want}, got {type(state.get(key)).__name__}"
            )


def check_compatible(
    state: dict[str, Any],
    expected_shapes: dict[str, tuple[int, ...]],
    *,
    path: str | Path,
    task_kind: str | None = None,
) -> None:
    """Check that a checkpoint's model parameters match ``expected_shapes`` (and the task kind).

    Raises:
        CheckpointError: naming the file and the first mismatch.
    """
    if task_kind is not None and state.get("task_kind") not in (None, task_kind):
        raise CheckpointError(
            f"checkpoint '{path}' was trained on {state.get('task_kind')} tasks, but the data here is {task_kind}"
        )
    params = model_part(state["meta_params"])
    missing = sorted(set(expected_shapes) - set(params))
    extra = sorted(set(params) - set(expected_shapes))
    if missing or extra:
        model = (state.get("model") or {}).get("name", "?")
        raise CheckpointError(
            f"checkpoint '{path}' holds a different model ({model}): missing parameters {missing[:5]}, unexpected "
            f"{extra[:5]}"
        )
    for k, shape in expected_shapes.items():
        if tuple(params[k].shape) != tuple(shape):
            raise CheckpointError(
                f"checkpoint '{path}': parameter '{k}' has shape {tuple(params[k].shape)}, the model here needs "
                f"{tuple(shape)}"
            )
