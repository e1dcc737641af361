"""Few-shot episodes over a pool of labelled images, split into groups (class-folder sets, ``hf`` datasets).

A *pool* is every image of a source, resized to one side and kept as ``uint8 [N, C, S, S]`` with
an integer label per image. A *group* is a set of rows of the pool that one episode draws from:
one federated client's partition, or every row of a split. An episode picks a group of its
split, then ``ways`` distinct classes among those the group holds at least ``shots + query``
images of (relabelled ``0 .. ways-1`` in the order drawn), then ``shots + query`` distinct images
of each (support first). ``"train"`` groups hold only background classes and ``"eval"`` groups
only held-out ones, so evaluation classes never appear in training.

Decoded pools are cached as one ``.npz`` per source (:func:`cached_pool`), keyed by everything
the pixels depend on, written atomically and verified on load.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fedmeta.errors import ConfigError
from fedmeta.tasks.base import SPLITS, TaskFamily
from fedmeta.types import TaskBatch

__all__ = ["ImagePool", "PoolFamily", "cached_pool", "resize_image", "POOL_FORMAT"]

log = logging.getLogger(__name__)

#: Bumped whenever decoding or resizing changes, so that old cache files are never reused.
POOL_FORMAT = 1


@dataclass(frozen=True)
class ImagePool:
    """Every image of a source.

    Attributes:
        images: ``uint8 [N, C, S, S]``.
        labels: ``int64 [N]`` class of each image.
        class_names: name of each class value (``class_names[v]`` for label ``v``).
        source: what was read (a folder or a dataset path), for messages.
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    source: str


def resize_image(img: object, *, size: int, channels: int) -> np.ndarray:
    """A PIL image as ``uint8 [channels, size, size]`` (grayscale ``L`` or ``RGB``, box-resized).

    BOX averages each output pixel's exact footprint (the antialiased shrink the glyphs and
    Omniglot use).
    """
    from PIL import Image

    assert isinstance(img, Image.Image)
    converted = img.convert("L" if channels == 1 else "RGB")
    if converted.size != (size, size):
        converted = converted.resize((size, size), Image.Resampling.BOX)
    arr = np.asarray(converted, dtype=np.uint8)
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _read(path: Path, key: str) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                raise ValueError("written for a different source or size")
            images, labels = np.asarray(data["images"]), np.asarray(data["labels"])
            names = tuple(str(n) for n in data["class_names"].tolist())
    except (OSError, KeyError, ValueError, EOFError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if images.dtype != np.uint8 or images.ndim != 4 or labels.shape != images.shape[:1]:
        raise ValueError(f"holds {images.dtype} {images.shape} images and {labels.shape} labels")
    return images, labels.astype(np.int64), names


def _write(path: Path, key: str, pool: ImagePool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buffer = io.BytesIO()
    np.savez(
        buffer, key=np.array(key), images=pool.images, labels=pool.labels, class_names=np.array(pool.class_names)
    )
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(buffer.getvalue())
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes it private; a cache may be shared by a team
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_pool(folder: Path, prefix: str, key: dict[str, object], build: Callable[[], ImagePool]) -> ImagePool:
    """The pool ``build`` decodes, read from ``folder`` when a cache file with the same ``key`` verifies.

    Args:
        folder: the cache folder.
        prefix: start of the file name (``"classes"``, ``"hf"``).
        key: everything the pixels depend on (a file listing's digest, the size, ...).
        build: decodes the source (called only on a cache miss).

    Returns:
        The pool; a cache that cannot be written only costs the caching, one that fails
        verification is logged and rebuilt.
    """
    text = json.dumps({"format": POOL_FORMAT, **key}, sort_keys=True)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    path = folder / f"{prefix}-{digest}.npz"
    if path.exists():
        try:
            images, labels, names = _read(path, text)
            log.debug("image pool loaded from %s", path)
            return ImagePool(images, labels, names, str(key.get("source", "")))
        except ValueError as exc:
            log.warning("image cache file %s cannot be trusted (%s); decoding the source again", path, exc)
    started = time.perf_counter()
    pool = build()
    log.info("decoded %d images of %s in %.1f s", pool.labels.shape[0], pool.source, time.perf_counter() - started)
    try:
        _write(path, text, pool)
        log.info("image pool cached at %s", path)
    except OSError as exc:
        log.warning("cannot write the image cache %s (%s); continuing without caching", path, exc)
    return pool


class PoolFamily(TaskFamily):
    """N-way K-shot episodes, each from one group of a labelled image pool.

    Args:
        pool: the images and labels.
        groups: per split (``"train"``, ``"eval"``), the groups of pool rows episodes draw from.
        ways, shots, query: episode shape.
        what: how messages name a group (``"client partition"``, ...).

    Raises:
        ConfigError: if no group of a split has ``ways`` classes with ``shots + query`` images each
            (naming ``task.ways``, ``task.shots`` and ``task.query``).
    """

    models = ("conv4",)
    kind = "classification"

    def __init__(
        self,
        pool: ImagePool,
        groups: dict[str, Sequence[np.ndarray]],
        *,
        ways: int,
        shots: int,
        query: int,
        what: str = "group",
    ) -> None:
        self.pool = pool
        self.ways, self.shots, self.query = ways, shots, query
        channels, size = int(pool.images.shape[1]), int(pool.images.shape[2])
        self.input_shape = (channels, size, size)
        self.output_dim = ways
        need = shots + query
        # global group index -> (rows, eligible classes); train groups first, then eval
        self._rows: list[np.ndarray] = []
        self._eligible: list[np.ndarray] = []
        self._usable: dict[str, np.ndarray] = {}
        for split in SPLITS:
            usable = []
            for rows in groups.get(split, ()):
                rows = np.asarray(rows, dtype=np.int64)
                classes, counts = np.unique(pool.labels[rows], return_counts=True)
                self._rows.append(rows)
                self._eligible.append(classes[counts >= need])
                if self._eligible[-1].size >= ways:
                    usable.append(len(self._rows) - 1)
            if not usable:
                raise ConfigError(
                    f"config keys 'task.ways' ({ways}), 'task.shots' ({shots}), 'task.query' ({query}): no "
                    f"{'held-out' if split == 'eval' else 'training'} {what} of '{pool.source}' has {ways} classes "
                    f"with {need} images each"
                )
            self._usable[split] = np.array(usable, dtype=np.int64)

    def sample_params(self, gen: torch.Generator, n: int, split: str) -> Tensor:
        """``[n, 1 + ways]``: a group index, then ``ways`` distinct class labels of that group."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        usable = self._usable[split]
        rows = torch.zeros(n, 1 + self.ways, dtype=torch.int64)
        picks = torch.randint(usable.shape[0], (n,), generator=gen).tolist()
        for i, p in enumerate(picks):
            g = int(usable[p])
            classes = self._eligible[g]
            chosen = torch.randperm(classes.shape[0], generator=gen)[: self.ways].numpy()
            rows[i, 0] = g
            rows[i, 1:] = torch.from_numpy(classes[chosen])
        return rows

    def make_tasks(self, params: Tensor, gen: torch.Generator) -> TaskBatch:
        """Episodes for ``params`` (``[T, 1 + ways]``); ``shots + query`` distinct images per class."""
        params = params.to(torch.int64)
        if params.dim() != 2 or params.shape[1] != 1 + self.ways:
            raise ValueError(f"task parameters must be [n, {1 + self.ways}], got {tuple(params.shape)}")
        t, per_class = params.shape[0], self.shots + self.query
        c, size = self.input_shape[0], self.input_shape[1]
        out = np.zeros((t, self.ways, per_class, c, size, size), dtype=np.uint8)
        for i, row in enumerate(params.tolist()):
            g, classes = row[0], row[1:]
            if not 0 <= g < len(self._rows):
                raise ValueError(f"group index {g} is not a group of this family")
            rows = self._rows[g]
            labels = self.pool.labels[rows]
            for way, cls in enumerate(classes):
                where = rows[labels == cls]
                if where.shape[0] < per_class:
                    raise ValueError(f"group {g} has only {where.shape[0]} images of class {cls}")
                pick = torch.randperm(where.shape[0], generator=gen)[:per_class].numpy()
                out[i, way] = self.pool.images[where[pick]]
        x = torch.from_numpy(out).to(torch.float32) / 255.0
        s, q = self.shots, self.query
        labels_of = torch.arange(self.ways)
        names = self.pool.class_names
        return TaskBatch(
            support_x=x[:, :, :s].reshape(t, self.ways * s, c, size, size),
            support_y=labels_of.repeat_interleave(s).expand(t, -1).contiguous(),
            query_x=x[:, :, s:].reshape(t, self.ways * q, c, size, size),
            query_y=labels_of.repeat_interleave(q).expand(t, -1).contiguous(),
            kind=self.kind,
            params=params,
            ids=tuple(" ".join(names[v] if 0 <= v < len(names) else str(v) for v in r[1:]) for r in params.tolist()),
        )

    def classes(self, split: str) -> np.ndarray:
        """The class labels episodes of ``split`` can draw (sorted)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        found = [self._eligible[g] for g in self._usable[split].tolist()]
        return np.unique(np.concatenate(found))
