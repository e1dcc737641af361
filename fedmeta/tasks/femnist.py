"""The ``femnist`` task family: FEMNIST in LEAF's JSON format (Caldas et al., 2018), writers as clients.

``task.data_dir`` is a folder of ``*.json`` files as LEAF's preprocessing writes them
(``data/femnist/data/train`` or ``.../all_data``), each::

    {"users": ["f0000_14", ...], "num_samples": [n, ...],
     "user_data": {"f0000_14": {"x": [[784 floats], ...], "y": [int, ...]}, ...}}

A writer is one user id (its data may be spread over several files, e.g. LEAF's train and test
halves: they are concatenated). Writers are sorted by id; the last ``task.heldout_writers`` of
them (default: a tenth, at least one) are *held out*: ``"eval"`` episodes come only from them,
for server evaluation and for what a new site sees. Federated client ``c`` is held writer ``c``
of the others, in sorted order; ``federation.clients_total`` may not exceed their number (no
wrap-around). Each of a writer's few-shot tasks is drawn from that writer's own characters: a
``ways``-way episode picks ``ways`` distinct classes among those the writer has at least
``shots + query`` samples of, relabelled ``0 .. ways-1`` in the order drawn. The whole family's
``"train"`` episodes pick a writer first (uniformly among the client writers that have enough
classes), then its classes.

Pixels are LEAF's ``[0, 1]`` floats with white paper (1.0) and dark ink; they are inverted to the
glyphs' convention (bright strokes on black, ``1 - x``) and resized from 28x28 to
``task.image_size`` if it differs. See ``docs/data-format.md``.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.config import Config
from fedmeta.errors import ConfigError, DataFormatError
from fedmeta.registry import require
from fedmeta.tasks.base import SPLITS, TaskFamily
from fedmeta.types import TaskBatch

__all__ = ["FemnistWriters", "FemnistFamily", "read_leaf", "split_writers", "HELDOUT_FRACTION", "LEAF_SIDE"]

log = logging.getLogger(__name__)

#: Side of LEAF's FEMNIST images (``x`` rows hold ``LEAF_SIDE ** 2`` pixels).
LEAF_SIDE = 28
#: Held-out share of the writers when ``task.heldout_writers`` is null (at least one writer).
HELDOUT_FRACTION = 0.1


@dataclass(frozen=True)
class FemnistWriters:
    """The writers of a LEAF folder, sorted by id.

    Attributes:
        folder: the folder read.
        names: writer ids.
        images: per writer, ``float32 [n, 28, 28]`` (bright ink on black).
        labels: per writer, ``int64 [n]`` character classes.
    """

    folder: Path
    names: tuple[str, ...]
    images: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]


def _user_arrays(path: Path, user: str, data: object) -> tuple[np.ndarray, np.ndarray]:
    if not isinstance(data, dict) or "x" not in data or "y" not in data:
        raise DataFormatError(f"LEAF file '{path}': user_data['{user}'] must be an object with keys 'x' and 'y'")
    try:
        x = np.asarray(data["x"], dtype=np.float32)
        y = np.asarray(data["y"], dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise DataFormatError(f"LEAF file '{path}': user_data['{user}'] holds non-numeric x or y ({exc})") from exc
    if x.ndim != 2 or x.shape[1] != LEAF_SIDE * LEAF_SIDE or y.ndim != 1 or x.shape[0] != y.shape[0]:
        raise DataFormatError(
            f"LEAF file '{path}': user_data['{user}'] must hold x as [n, {LEAF_SIDE * LEAF_SIDE}] pixels and y as "
            f"[n] labels, got x {list(x.shape)} and y {list(y.shape)}"
        )
    if np.any(y < 0) or not np.all(np.isfinite(x)):
        raise DataFormatError(f"LEAF file '{path}': user_data['{user}'] has a negative label or a non-finite pixel")
    return x, y


def read_leaf(folder: str | Path) -> FemnistWriters:
    """Read every ``*.json`` file of a LEAF folder.

    Raises:
        DataFormatError: naming the folder (missing, no JSON files) or the file (not JSON, missing
            ``users`` / ``user_data``, a listed user without data, malformed ``x``/``y``).
    """
    base = Path(folder).expanduser()
    if not base.is_dir():
        raise DataFormatError(f"FEMNIST folder '{base}' (task.data_dir) does not exist or is not a folder")
    files = sorted(p for p in base.glob("*.json") if p.is_file())
    if not files:
        raise DataFormatError(f"FEMNIST folder '{base}' holds no LEAF *.json files")
    xs: dict[str, list[np.ndarray]] = {}
    ys: dict[str, list[np.ndarray]] = {}
    for path in files:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise DataFormatError(f"LEAF file '{path}' cannot be read as JSON: {exc}") from exc
        if not isinstance(doc, dict) or "users" not in doc or "user_data" not in doc:
            keys = sorted(doc) if isinstance(doc, dict) else type(doc).__name__
            raise DataFormatError(f"LEAF file '{path}' must have keys 'users' and 'user_data'; it has {keys}")
        users, user_data = doc["users"], doc["user_data"]
        if not isinstance(users, list) or not isinstance(user_data, dict):
            raise DataFormatError(f"LEAF file '{path}': 'users' must be a list and 'user_data' an object")
        counts = doc.get("num_samples")
        for i, user in enumerate(users):
            if not isinstance(user, str) or user not in user_data:
                raise DataFormatError(f"LEAF file '{path}' lists user {user!r} that has no entry in 'user_data'")
            x, y = _user_arrays(path, user, user_data[user])
            if isinstance(counts, list) and i < len(counts) and counts[i] != y.shape[0]:
                raise DataFormatError(
                    f"LEAF file '{path}': num_samples says {counts[i]} for user '{user}' but it has {y.shape[0]}"
                )
            xs.setdefault(user, []).append(x)
            ys.setdefault(user, []).append(y)
    names = tuple(sorted(xs))
    if not names:
        raise DataFormatError(f"FEMNIST folder '{base}' lists no users")
    images = tuple(1.0 - np.concatenate(xs[u]).reshape(-1, LEAF_SIDE, LEAF_SIDE) for u in names)
    labels = tuple(np.concatenate(ys[u]) for u in names)
    return FemnistWriters(base, names, images, labels)


def split_writers(num_writers: int, heldout: int | None) -> int:
    """Number of held-out writers (the last ones by id): ``heldout``, or a tenth (at least 1).

    Raises:
        ConfigError: if that leaves no writer to train on (naming ``task.heldout_writers``).
    """
    count = max(1, math.ceil(HELDOUT_FRACTION * num_writers)) if heldout is None else heldout
    if count >= num_writers:
        raise ConfigError(
            f"config key 'task.heldout_writers' ({heldout}) holds out {count} of the {num_writers} writers, "
            "leaving none to train on"
        )
    return count


class FemnistFamily(TaskFamily):
    """Few-shot episodes, each from one writer's characters.

    Args:
        writers: the folder's writers.
        train_writers: indices of the writers ``"train"`` episodes come from (one for a client).
        eval_writers: indices of the held-out writers.
        ways, shots, query: episode shape.
        image_size: image side (resized from 28 if different).
    """

    name = "femnist"
    models = ("conv4",)
    kind = "classification"
    per_client = True

    @classmethod
    def from_config(cls, cfg: Config, *, site: str | Path | None = None) -> TaskFamily:
        """Every client writer for ``"train"``, the held-out writers for ``"eval"`` (``site`` is not used)."""
        return build_femnist_family(cfg)

    @classmethod
    def for_client(cls, cfg: Config, client_id: int) -> TaskFamily:
        """Client ``client_id`` = writer ``client_id`` (sorted ids, held-out writers excluded)."""
        return build_femnist_family(cfg, client_id=client_id)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``task.heldout_writers`` null or at least 1."""
        h = cfg.task.heldout_writers
        require(h is None or h >= 1, "task.heldout_writers", h, "must be null or at least 1")

    def __init__(
        self,
        writers: FemnistWriters,
        train_writers: list[int],
        eval_writers: list[int],
        *,
        ways: int,
        shots: int,
        query: int,
        image_size: int,
    ) -> None:
        self.writers = writers
        self.ways, self.shots, self.query = ways, shots, query
        self.image_size = image_size
        self.input_shape = (1, image_size, image_size)
        self.output_dim = ways
        need = shots + query
        # per writer: the classes with enough samples
        self._eligible: dict[int, np.ndarray] = {}
        for w in sorted(set(train_writers) | set(eval_writers)):
            classes, counts = np.unique(writers.labels[w], return_counts=True)
            self._eligible[w] = classes[counts >= need]
        self._writers: dict[str, np.ndarray] = {}
        for split, members in (("train", train_writers), ("eval", eval_writers)):
            usable = [w for w in members if self._eligible[w].size >= ways]
            if not usable:
                raise ConfigError(
                    f"config keys 'task.ways' ({ways}), 'task.shots' ({shots}), 'task.query' ({query}): no "
                    f"{'held-out' if split == 'eval' else 'training'} writer of '{writers.folder}' (of "
                    f"{', '.join(writers.names[w] for w in members[:5])}{' ...' if len(members) > 5 else ''}) has "
                    f"{ways} characters with {need} samples each"
                )
            self._writers[split] = np.array(usable, dtype=np.int64)

    def sample_params(self, gen: torch.Generator, n: int, split: str) -> Tensor:
        """``[n, 1 + ways]``: a writer index, then ``ways`` distinct character classes of that writer."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        pool = self._writers[split]
        rows = torch.zeros(n, 1 + self.ways, dtype=torch.int64)
        picks = torch.randint(pool.shape[0], (n,), generator=gen).tolist()
        for i, p in enumerate(picks):
            w = int(pool[p])
            classes = self._eligible[w]
            chosen = torch.randperm(classes.shape[0], generator=gen)[: self.ways].numpy()
            rows[i, 0] = w
            rows[i, 1:] = torch.from_numpy(classes[chosen])
        return rows

    def make_tasks(self, params: Tensor, gen: torch.Generator) -> TaskBatch:
        """Episodes for ``params`` (``[T, 1 + ways]``); ``shots + query`` distinct samples per class."""
        params = params.to(torch.int64)
        if params.dim() != 2 or params.shape[1] != 1 + self.ways:
            raise ValueError(f"femnist task parameters must be [n, {1 + self.ways}], got {tuple(params.shape)}")
        t, per_class = params.shape[0], self.shots + self.query
        out = np.zeros((t, self.ways, per_class, LEAF_SIDE, LEAF_SIDE), dtype=np.float32)
        for i, row in enumerate(params.tolist()):
            w, classes = row[0], row[1:]
            if w not in self._eligible:
                raise ValueError(f"writer index {w} is not a writer of this family")
            labels = self.writers.labels[w]
            for way, cls in enumerate(classes):
                where = np.flatnonzero(labels == cls)
                if where.shape[0] < per_class:
                    raise ValueError(f"writer '{self.writers.names[w]}' has only {where.shape[0]} samples of {cls}")
                pick = torch.randperm(where.shape[0], generator=gen)[:per_class].numpy()
                out[i, way] = self.writers.images[w][where[pick]]
        x = torch.from_numpy(out).reshape(t * self.ways * per_class, 1, LEAF_SIDE, LEAF_SIDE)
        size = self.image_size
        if size != LEAF_SIDE:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
        x = x.reshape(t, self.ways, per_class, 1, size, size)
        s, q = self.shots, self.query
        labels_of = torch.arange(self.ways)
        return TaskBatch(
            support_x=x[:, :, :s].reshape(t, self.ways * s, 1, size, size),
            support_y=labels_of.repeat_interleave(s).expand(t, -1).contiguous(),
            query_x=x[:, :, s:].reshape(t, self.ways * q, 1, size, size),
            query_y=labels_of.repeat_interleave(q).expand(t, -1).contiguous(),
            kind=self.kind,
            params=params,
            ids=tuple(f"{self.writers.names[r[0]]}: {' '.join(map(str, r[1:]))}" for r in params.tolist()),
        )


def build_femnist_family(cfg: Config, client_id: int | None = None) -> FemnistFamily:
    """The femnist family of a config: all client writers, or client ``client_id``'s own writer.

    Raises:
        ConfigError: if ``task.data_dir`` is unset, ``federation.clients_total`` exceeds the
            writers left after the held-out ones (naming both keys and the folder), or a writer
            lacks ``ways`` characters with ``shots + query`` samples.
        DataFormatError: if the folder or a file does not match LEAF's format.
    """
    t = cfg.task
    if t.data_dir is None:
        raise ConfigError("config key 'task.data_dir' must name a folder of LEAF *.json files for task.name 'femnist'")
    writers = read_leaf(t.data_dir)
    heldout = split_writers(len(writers.names), t.heldout_writers)
    held = len(writers.names) - heldout
    total = cfg.federation.clients_total
    if total > held:
        raise ConfigError(
            f"config key 'federation.clients_total' ({total}) exceeds the {held} writers of '{writers.folder}' "
            f"left for training after task.heldout_writers ({heldout} held out); each client is one writer"
        )
    if client_id is not None and not 0 <= client_id < total:
        raise ConfigError(f"client id {client_id} is outside federation.clients_total ({total})")
    train = list(range(total)) if client_id is None else [client_id]
    log.debug("femnist: %d writers, %d held out, clients %s", len(writers.names), heldout, train[:5])
    return FemnistFamily(
        writers,
        train,
        list(range(held, len(writers.names))),
        ways=t.ways,
        shots=t.shots,
        query=t.query,
        image_size=t.image_size,
    )
