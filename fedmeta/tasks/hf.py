"""The ``hf`` task family: a dataset Hugging Face ``datasets`` opens from a local path, partitioned by Flower Datasets.

Options live under ``task.hf`` (:class:`fedmeta.config.HFConfig`; ``docs/data-format.md``):

* ``path`` and ``format``: ``disk`` (a folder written by ``Dataset.save_to_disk`` /
  ``DatasetDict.save_to_disk``, opened with ``datasets.load_from_disk``), ``imagefolder``
  (``PATH/CLASS/*.png``, or ``PATH/SPLIT/CLASS/*.png``) or ``parquet`` (a ``.parquet`` file or a
  folder of them); ``split`` picks one split of a ``DatasetDict``.
* ``image_column`` / ``label_column``: an image (``datasets.Image``, or PIL images) and an
  integer or string class per row.
* ``heldout_classes``: the last classes by label value (a fifth of them by default, at least
  ``task.ways``) are held out: ``"eval"`` episodes (server evaluation, new sites) come only from
  them and no client holds any of their rows.
* ``partitioner``: the background rows are split among ``federation.clients_total`` clients by
  Flower Datasets' own partitioner (``flwr_datasets.partitioner``): ``iid``
  (``IidPartitioner``), ``dirichlet`` (``DirichletPartitioner`` over ``partition_by``, default the
  label, with ``alpha`` and ``min_partition_size``), ``pathological``
  (``PathologicalPartitioner``, ``classes_per_partition`` classes per client) or ``natural-id``
  (``NaturalIdPartitioner`` over the ``partition_by`` column, e.g. a writer id: client ``c`` is
  the ``c``-th id in order of first appearance). Client ``c`` is partition ``c``; each of its
  few-shot tasks is drawn from its own partition's classes (those it holds ``shots + query``
  rows of).

Images are converted to grayscale (``channels: 1``) or RGB (``3``), box-resized to
``task.image_size``, inverted with ``invert: true`` (dark strokes on white become the glyphs'
bright ink on black) and cached as one ``.npz`` under the cache folder, keyed by the dataset's
fingerprint. Nothing downloads: :func:`hf_offline` sets the Hugging Face offline switches
around every call into ``datasets``. The family needs the ``datasets`` extra
(``pip install -e ".[datasets]"``); without it, selecting ``task.name: hf`` is refused with
that command.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from fedmeta.config import Config, HFConfig
from fedmeta.errors import ConfigError, DataFormatError
from fedmeta.registry import require
from fedmeta.tasks.base import TaskFamily
from fedmeta.tasks.glyphs.cache import cache_dir
from fedmeta.tasks.labelled import ImagePool, PoolFamily, cached_pool, resize_image

__all__ = [
    "HFFamily",
    "HF_FORMATS",
    "HF_PARTITIONERS",
    "EXTRA_INSTALL",
    "HELDOUT_CLASS_FRACTION",
    "build_hf_family",
    "hf_offline",
    "heldout_class_count",
    "load_hf_dataset",
    "load_hf_pool",
    "partition_rows",
    "require_extra",
]

log = logging.getLogger(__name__)

HF_FORMATS = ("disk", "imagefolder", "parquet")
HF_PARTITIONERS = ("iid", "dirichlet", "natural-id", "pathological")
#: How to install what ``task.name: hf`` needs.
EXTRA_INSTALL = 'pip install -e ".[datasets]"  (or: pip install flwr-datasets==0.6.1)'
#: Held-out share of the classes when ``task.hf.heldout_classes`` is null.
HELDOUT_CLASS_FRACTION = 0.2
_OFFLINE = {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
#: row index column added to the (image-free) table the partitioners see
_ROW = "__fedmeta_row__"


def require_extra() -> tuple[Any, Any]:
    """Import ``datasets`` and ``flwr_datasets.partitioner``.

    Raises:
        ConfigError: naming ``task.name`` and :data:`EXTRA_INSTALL` when either is missing.
    """
    try:
        with hf_offline():
            datasets = importlib.import_module("datasets")
            partitioner = importlib.import_module("flwr_datasets.partitioner")
    except ImportError as exc:
        raise ConfigError(
            f"config key 'task.name' is 'hf', which needs the optional 'datasets' extra ({exc.name or exc} is "
            f"not installed): {EXTRA_INSTALL}"
        ) from exc
    return datasets, partitioner


@contextmanager
def hf_offline() -> Iterator[None]:
    """Within the block, Hugging Face ``datasets`` and the Hub never reach the network.

    Sets ``HF_DATASETS_OFFLINE=1`` and ``HF_HUB_OFFLINE=1`` (read when those libraries are
    imported) and, for libraries imported earlier, their module-level switches; everything is
    restored on exit. Never applied at import time.
    """
    saved_env = {k: os.environ.get(k) for k in _OFFLINE}
    os.environ.update(_OFFLINE)
    patched: list[tuple[Any, str, Any]] = []
    for module, names in (
        ("datasets.config", ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE")),
        ("huggingface_hub.constants", ("HF_HUB_OFFLINE",)),
    ):
        mod = sys.modules.get(module)
        for name in names:
            if mod is not None and hasattr(mod, name):
                patched.append((mod, name, getattr(mod, name)))
                setattr(mod, name, True)
    try:
        yield
    finally:
        for mod, name, value in reversed(patched):
            setattr(mod, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def load_hf_dataset(hf: HFConfig, *, cache: Path) -> Any:
    """Open ``task.hf.path`` as a ``datasets.Dataset`` (one split), offline.

    Args:
        hf: the ``task.hf`` options.
        cache: where ``datasets`` may write its Arrow cache (image folders and parquet).

    Raises:
        ConfigError: if ``task.hf.path`` is unset or the extra is missing.
        DataFormatError: naming the path, split or column that does not match.
    """
    datasets, _ = require_extra()
    if not hf.path:
        raise ConfigError("config key 'task.hf.path' must name a local dataset for task.name 'hf'")
    path = Path(hf.path).expanduser()
    if not path.exists():
        raise DataFormatError(f"dataset path '{path}' (task.hf.path) does not exist")
    try:
        with hf_offline():
            if hf.format == "disk":
                ds = datasets.load_from_disk(str(path))
            elif hf.format == "imagefolder":
                if not path.is_dir():
                    raise DataFormatError(f"dataset path '{path}' (task.hf.path) must be a folder for imagefolder")
                ds = datasets.load_dataset("imagefolder", data_dir=str(path), cache_dir=str(cache))
            else:
                files = [path] if path.is_file() else sorted(path.rglob("*.parquet"))
                if not files:
                    raise DataFormatError(f"dataset path '{path}' (task.hf.path) holds no *.parquet files")
                ds = datasets.load_dataset(
                    "parquet", data_files=[str(f) for f in files], split="train", cache_dir=str(cache)
                )
    except DataFormatError:
        raise
    except (FileNotFoundError, ValueError, OSError) as exc:
        raise DataFormatError(
            f"dataset path '{path}' (task.hf.path) cannot be opened as format '{hf.format}' (task.hf.format): {exc}"
        ) from exc
    if isinstance(ds, datasets.DatasetDict):
        if hf.split not in ds:
            raise DataFormatError(
                f"dataset '{path}' has no split '{hf.split}' (task.hf.split); it has {', '.join(sorted(ds))}"
            )
        ds = ds[hf.split]
    for key, column in (("task.hf.image_column", hf.image_column), ("task.hf.label_column", hf.label_column)):
        if column not in ds.column_names:
            raise DataFormatError(
                f"dataset '{path}' has no column '{column}' ({key}); its columns are {', '.join(ds.column_names)}"
            )
    return ds


def _labels(ds: Any, column: str, path: str) -> tuple[np.ndarray, tuple[str, ...]]:
    values = ds[column]
    feature = ds.features[column]
    names = getattr(feature, "names", None)
    if names is not None:
        return np.asarray(values, dtype=np.int64), tuple(str(n) for n in names)
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        labels = np.asarray(values, dtype=np.int64)
        if labels.size and labels.min() < 0:
            raise DataFormatError(f"dataset '{path}': column '{column}' (task.hf.label_column) has negative labels")
        return labels, tuple(str(v) for v in range(int(labels.max()) + 1 if labels.size else 0))
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        index = {n: i for i, n in enumerate(names)}
        return np.asarray([index[v] for v in values], dtype=np.int64), tuple(names)
    raise DataFormatError(
        f"dataset '{path}': column '{column}' (task.hf.label_column) must hold integer or string classes"
    )


def _decode(value: object, where: str) -> object:
    from PIL import Image, UnidentifiedImageError

    if isinstance(value, Image.Image):
        return value
    try:
        if isinstance(value, dict) and value.get("bytes") is not None:
            import io

            img = Image.open(io.BytesIO(value["bytes"]))
            img.load()
            return img
        if isinstance(value, dict) and value.get("path"):
            with Image.open(value["path"]) as img:
                img.load()
                return img.copy()
        arr = np.asarray(value)
        if arr.ndim in (2, 3) and arr.dtype != object:
            return Image.fromarray(arr.astype(np.uint8))
    except (OSError, UnidentifiedImageError, ValueError, TypeError) as exc:
        raise DataFormatError(f"{where} cannot be read as an image: {exc}") from exc
    raise DataFormatError(f"{where} is not an image (got {type(value).__name__})")


def load_hf_pool(cfg: Config) -> tuple[Any, ImagePool]:
    """The dataset of ``task.hf`` and its images, decoded and resized (from the cache when it verifies).

    Raises:
        ConfigError, DataFormatError: as :func:`load_hf_dataset`; DataFormatError also naming a row
            whose image cannot be decoded.
    """
    t = cfg.task
    hf = t.hf
    base = cache_dir(t.cache_dir).parent / "hf"
    ds = load_hf_dataset(hf, cache=base / "datasets")
    source = str(Path(hf.path or "").expanduser())

    def build() -> ImagePool:
        labels, names = _labels(ds, hf.label_column, source)
        images = np.empty((len(ds), hf.channels, t.image_size, t.image_size), dtype=np.uint8)
        from PIL import Image

        with hf_offline():
            plain = ds.cast_column(hf.image_column, _image_feature(ds, hf.image_column))
            for start in range(0, len(plain), 256):
                batch = plain[start : start + 256][hf.image_column]
                for j, value in enumerate(batch):
                    where = f"dataset '{source}' row {start + j} (column '{hf.image_column}')"
                    img = _decode(value, where)
                    assert isinstance(img, Image.Image)
                    images[start + j] = resize_image(img, size=t.image_size, channels=hf.channels)
        if hf.invert:
            np.subtract(255, images, out=images)
        return ImagePool(images, labels, names, source)

    key: dict[str, object] = {
        "source": source,
        "fingerprint": getattr(ds, "_fingerprint", ""),
        "rows": len(ds),
        "image": hf.image_column,
        "label": hf.label_column,
        "split": hf.split,
        "format": hf.format,
        "image_size": int(t.image_size),
        "channels": int(hf.channels),
        "invert": bool(hf.invert),
    }
    return ds, cached_pool(base, "hf", key, build)


def _image_feature(ds: Any, column: str) -> Any:
    """The column's feature with decoding off (``Image(decode=False)``), so a bad file is named, not raised deep."""
    import datasets

    feature = ds.features[column]
    if isinstance(feature, datasets.Image):
        return datasets.Image(decode=False)
    return feature


def heldout_class_count(num_classes: int, heldout: int | None, ways: int) -> int:
    """Number of held-out classes (the last ones by label): ``heldout``, or a fifth (at least ``ways``).

    Raises:
        ConfigError: if that leaves fewer than ``ways`` background classes or holds out fewer than
            ``ways`` (naming ``task.hf.heldout_classes``).
    """
    count = max(ways, math.ceil(HELDOUT_CLASS_FRACTION * num_classes)) if heldout is None else heldout
    if count < ways or num_classes - count < ways:
        raise ConfigError(
            f"config key 'task.hf.heldout_classes' ({heldout}) holds out {count} of the {num_classes} classes; "
            f"both the held-out and the background classes must number at least task.ways ({ways})"
        )
    return count


def partition_rows(cfg: Config, ds: Any, labels: np.ndarray, rows: np.ndarray, client_id: int) -> np.ndarray:
    """The rows (of ``rows``, the background rows) that client ``client_id`` holds, by Flower Datasets' partitioner.

    The partitioner sees a table of the background rows' labels (and ``partition_by`` column)
    only, never the images.

    Raises:
        ConfigError: for a client beyond the partitions (natural-id), naming the keys.
    """
    datasets, partitioners = require_extra()
    hf = cfg.task.hf
    total = cfg.federation.clients_total
    by = hf.partition_by or hf.label_column
    table: dict[str, Any] = {_ROW: rows.tolist(), hf.label_column: labels[rows].tolist()}
    if by != hf.label_column:
        if by not in ds.column_names:
            raise DataFormatError(
                f"dataset '{hf.path}' has no column '{by}' (task.hf.partition_by); its columns are "
                f"{', '.join(ds.column_names)}"
            )
        column = ds[by]
        table[by] = [column[int(r)] for r in rows]
    with hf_offline():
        light = datasets.Dataset.from_dict(table)
        if hf.partitioner == "iid":
            part = partitioners.IidPartitioner(num_partitions=total)
        elif hf.partitioner == "dirichlet":
            part = partitioners.DirichletPartitioner(
                num_partitions=total,
                partition_by=by,
                alpha=hf.alpha,
                min_partition_size=hf.min_partition_size,
                seed=cfg.seed,
            )
        elif hf.partitioner == "pathological":
            part = partitioners.PathologicalPartitioner(
                num_partitions=total,
                partition_by=by,
                num_classes_per_partition=hf.classes_per_partition,
                seed=cfg.seed,
            )
        else:
            part = partitioners.NaturalIdPartitioner(partition_by=by)
        part.dataset = light
        if part.num_partitions < total:
            raise ConfigError(
                f"config key 'federation.clients_total' ({total}) exceeds the {part.num_partitions} partitions of "
                f"'{hf.path}' by task.hf.partition_by '{by}' (task.hf.partitioner natural-id: one client per id)"
            )
        chosen = part.load_partition(client_id)
        return np.asarray(chosen[_ROW], dtype=np.int64)


class HFFamily(PoolFamily):
    """Few-shot episodes over a local Hugging Face dataset; clients hold Flower Datasets partitions."""

    name = "hf"
    per_client = True

    @classmethod
    def from_config(cls, cfg: Config, *, site: str | Path | None = None) -> TaskFamily:
        """Every background row for ``"train"``, the held-out classes for ``"eval"`` (``site`` is not used)."""
        return build_hf_family(cfg)

    @classmethod
    def for_client(cls, cfg: Config, client_id: int) -> TaskFamily:
        """Client ``client_id``'s partition of the background rows."""
        return build_hf_family(cfg, client_id=client_id)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The ``task.hf`` keys in range; when selected, a path and (natural-id) a partition column."""
        hf = cfg.task.hf
        require(hf.format in HF_FORMATS, "task.hf.format", hf.format, f"must be one of {', '.join(HF_FORMATS)}")
        require(
            hf.partitioner in HF_PARTITIONERS,
            "task.hf.partitioner",
            hf.partitioner,
            f"must be one of {', '.join(HF_PARTITIONERS)}",
        )
        require(hf.alpha > 0 and math.isfinite(hf.alpha), "task.hf.alpha", hf.alpha, "must be a positive number")
        require(hf.min_partition_size >= 0, "task.hf.min_partition_size", hf.min_partition_size, "must be >= 0")
        per = hf.classes_per_partition
        require(per >= 1, "task.hf.classes_per_partition", per, "must be >= 1")
        require(
            hf.heldout_classes is None or hf.heldout_classes >= 1,
            "task.hf.heldout_classes",
            hf.heldout_classes,
            "must be null or at least 1",
        )
        require(hf.channels in (1, 3), "task.hf.channels", hf.channels, "must be 1 (grayscale) or 3 (RGB)")
        for key, value in (("task.hf.image_column", hf.image_column), ("task.hf.label_column", hf.label_column)):
            require(bool(value), key, value, "must name a column")
        if cfg.task.name == cls.name:
            require(bool(hf.path), "task.hf.path", hf.path, "must name a local dataset for task.name 'hf'")
            require(
                hf.partitioner != "natural-id" or bool(hf.partition_by),
                "task.hf.partition_by",
                hf.partition_by,
                "must name the id column for task.hf.partitioner natural-id",
            )


def build_hf_family(cfg: Config, client_id: int | None = None) -> HFFamily:
    """The hf family of a config: every background row, or client ``client_id``'s partition of them.

    Raises:
        ConfigError: if the extra or ``task.hf.path`` is missing, the class split or a partition is
            too small for ``task.ways``, or a client is out of range.
        DataFormatError: if the dataset does not open or lacks a column (naming it).
    """
    t = cfg.task
    ds, pool = load_hf_pool(cfg)
    values = np.unique(pool.labels)
    held = heldout_class_count(values.shape[0], t.hf.heldout_classes, t.ways)
    evaluation = values[values.shape[0] - held :]
    is_eval = np.isin(pool.labels, evaluation)
    background, heldout = np.flatnonzero(~is_eval), np.flatnonzero(is_eval)
    if client_id is None:
        train = background
    else:
        total = cfg.federation.clients_total
        if not 0 <= client_id < total:
            raise ConfigError(f"client id {client_id} is outside federation.clients_total ({total})")
        train = partition_rows(cfg, ds, pool.labels, background, client_id)
    log.debug("hf: %d classes, %d held out, client %s holds %d rows", values.shape[0], held, client_id, train.size)
    what = "dataset" if client_id is None else f"partition of client {client_id} (task.hf.partitioner)"
    return HFFamily(
        pool, {"train": [train], "eval": [heldout]}, ways=t.ways, shots=t.shots, query=t.query, what=what
    )
