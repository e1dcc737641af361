"""A site's own tasks on disk (the ``folder`` task family).

On-disk format (documented for users in ``docs/data-format.md``)::

    SITE/
      site.yaml            optional: {kind: regression | classification, name: ...}
      tasks/               the site's tasks, one file each: NAME.npz
      heldout/             optional: tasks kept for evaluation only (never trained on)

Each ``NAME.npz`` holds either

* ``x`` and ``y``: all examples of the task; every round a fresh random support/query split of
  ``task.shots`` / ``task.query`` examples is drawn (per class for classification), or
* ``support_x``, ``support_y``, ``query_x``, ``query_y``: a split the site declares; support and
  query examples are then drawn only from their own side.

``x`` is ``[N, *input_shape]`` float; ``y`` is ``[N]`` or ``[N, outputs]`` float for regression
and ``[N]`` integer class labels for classification. A folder of sites (as ``fedmeta make-data``
writes) is ``ROOT/site-0000, ROOT/site-0001, ...``; client ``c`` of a simulation is the ``c``-th
site in sorted order.

``task.data_dir`` may instead be a class-folder tree in the mini-ImageNet split layout
(``ROOT/train/CLASS/*.jpg``, ``ROOT/test/CLASS/*.jpg``): :mod:`fedmeta.tasks.class_folders`.

A classification task may instead be a folder of images, ``tasks/NAME/CLASS/*.png`` (one folder
per class; labels are the class folders in sorted order), or ``tasks/NAME/support/CLASS/*.png``
plus ``tasks/NAME/query/CLASS/*.png`` for a declared split. Pixels are scaled to [0, 1];
grayscale images give ``[1, H, W]`` inputs, colour images ``[3, H, W]``. A site made only of
image folders is a classification site even without ``site.yaml``.

``site.yaml`` may set ``query_fraction: F`` (0 < F < 1): each ``x``/``y`` task is then split once,
deterministically from its name, into a support side and a query side holding a fraction ``F`` of
its examples (per class for classification), as if the site had declared that split.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml
from torch import Tensor

from fedmeta.errors import ConfigError, DataFormatError
from fedmeta.registry import require
from fedmeta.rng import derive_seed
from fedmeta.tasks.base import SPLITS, TaskFamily
from fedmeta.types import TaskBatch

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = [
    "SiteTask",
    "FolderFamily",
    "TooFewClassesError",
    "load_site_tasks",
    "list_sites",
    "write_site",
    "load_image",
    "SITE_KINDS",
    "IMAGE_SUFFIXES",
]

SITE_KINDS = ("regression", "classification")
#: file suffixes read as images in image-folder tasks
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".pgm", ".tif", ".tiff")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")
_DECLARED = ("support_x", "support_y", "query_x", "query_y")
_HINT = "see docs/data-format.md"


class TooFewClassesError(DataFormatError):
    """A classification task has fewer usable classes than the episodes' ``ways``."""


@dataclass(frozen=True)
class SiteTask:
    """One task read from disk: all examples, or a declared support/query split."""

    name: str
    path: Path
    x: np.ndarray | None = None
    y: np.ndarray | None = None
    support: tuple[np.ndarray, np.ndarray] | None = None
    query: tuple[np.ndarray, np.ndarray] | None = None
    #: class names of an image-folder task (label ``i`` is ``classes[i]``); ``None`` for arrays
    classes: tuple[str, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one example."""
        arr = self.x if self.x is not None else self.support[0]  # type: ignore[index]
        return tuple(arr.shape[1:])


def _real(arr: np.ndarray) -> bool:
    """Whether ``arr`` holds real numbers (integers or floats; not bool, complex, text or objects)."""
    return bool(np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating))


def _check_xy(
    path: Path, x: np.ndarray, y: np.ndarray, xname: str, yname: str, kind: str
) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim < 1 or x.shape[0] == 0:
        raise DataFormatError(f"task file '{path}': array '{xname}' is empty ({_HINT})")
    if y.ndim < 1:
        raise DataFormatError(
            f"task file '{path}': '{yname}' must be an array with one entry per example, got a scalar ({_HINT})"
        )
    if x.ndim == 1:
        x = x[:, None]
    if y.shape[0] != x.shape[0]:
        raise DataFormatError(
            f"task file '{path}': '{xname}' has {x.shape[0]} examples but '{yname}' has {y.shape[0]} ({_HINT})"
        )
    if not _real(x):
        raise DataFormatError(f"task file '{path}': '{xname}' must hold real numbers, got dtype {x.dtype}")
    if 0 in x.shape:
        raise DataFormatError(f"task file '{path}': '{xname}' has shape {x.shape}, an example with no values")
    # checked after the cast: a float64 beyond float32's range becomes Inf
    with np.errstate(over="ignore"):
        x = x.astype(np.float32)
    if not np.all(np.isfinite(x)):
        raise DataFormatError(f"task file '{path}': '{xname}' contains NaN or Inf (or values beyond float32)")
    if kind == "classification":
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataFormatError(
                f"task file '{path}': classification labels '{yname}' must be a 1-D integer array, "
                f"got shape {y.shape} dtype {y.dtype} ({_HINT})"
            )
        return x, y.astype(np.int64)
    if not _real(y):
        raise DataFormatError(f"task file '{path}': '{yname}' must hold real numbers, got dtype {y.dtype}")
    if y.ndim == 1:
        y = y[:, None]
    if y.ndim != 2 or y.shape[1] == 0:
        raise DataFormatError(
            f"task file '{path}': regression targets '{yname}' must be [N] or [N, outputs], got shape {y.shape}"
        )
    with np.errstate(over="ignore"):
        y = y.astype(np.float32)
    if not np.all(np.isfinite(y)):
        raise DataFormatError(f"task file '{path}': '{yname}' contains NaN or Inf (or values beyond float32)")
    return x, y


def _read_task(path: Path, kind: str) -> SiteTask:
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataFormatError(f"task file '{path}' is not a readable .npz archive: {exc}") from exc
    if "x" in arrays and "y" in arrays:
        x, y = _check_xy(path, arrays["x"], arrays["y"], "x", "y", kind)
        return SiteTask(path.stem, path, x=x, y=y)
    if all(k in arrays for k in _DECLARED):
        sx, sy = _check_xy(path, arrays["support_x"], arrays["support_y"], "support_x", "support_y", kind)
        qx, qy = _check_xy(path, arrays["query_x"], arrays["query_y"], "query_x", "query_y", kind)
        if sx.shape[1:] != qx.shape[1:]:
            raise DataFormatError(
                f"task file '{path}': support inputs have shape {sx.shape[1:]} but query inputs {qx.shape[1:]}"
            )
        return SiteTask(path.stem, path, support=(sx, sy), query=(qx, qy))
    raise DataFormatError(
        f"task file '{path}' must contain arrays 'x' and 'y', or 'support_x', 'support_y', "
        f"'query_x' and 'query_y'; it has {sorted(arrays) or 'none'} ({_HINT})"
    )


def load_image(path: str | Path) -> np.ndarray:
    """Read one image as a float32 ``[C, H, W]`` array in [0, 1].

    Grayscale files (PIL modes 1, L, LA, I, I;16, F) give ``C = 1``; every other mode (RGB, RGBA,
    palette, CMYK) is converted to RGB, ``C = 3``. Alpha is dropped. 16-bit and float images are
    converted by PIL to 8 bits first.

    Raises:
        DataFormatError: naming the file if it cannot be decoded.
    """
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()
            gray = img.mode in _GRAY_MODES
            arr = np.asarray(img.convert("L" if gray else "RGB"), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataFormatError(f"image file '{p}' cannot be read as an image: {exc}") from exc
    return arr[None] if arr.ndim == 2 else np.ascontiguousarray(arr.transpose(2, 0, 1))


def _read_class_folders(
    folder: Path, classes: tuple[str, ...] | None = None
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    found = tuple(sorted(d.name for d in folder.iterdir() if d.is_dir()))
    if classes is None:
        classes = found
    elif found != classes:
        raise DataFormatError(
            f"image folder '{folder}' has class folders {list(found)}, but its support side has {list(classes)} "
            f"({_HINT})"
        )
    if not classes:
        raise DataFormatError(
            f"image folder '{folder}' holds no class folders (expected {folder}/CLASS/*.png; {_HINT})"
        )
    xs: list[np.ndarray] = []
    ys: list[int] = []
    shape: tuple[int, ...] | None = None
    for label, name in enumerate(classes):
        files = sorted(f for f in (folder / name).iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataFormatError(
                f"class folder '{folder / name}' holds no images ({', '.join(IMAGE_SUFFIXES)}; {_HINT})"
            )
        for f in files:
            img = load_image(f)
            if shape is None:
                shape = img.shape
            elif img.shape != shape:
                raise DataFormatError(
                    f"image file '{f}' has shape {img.shape} (channels, height, width) but earlier images in "
                    f"'{folder}' have {shape}; all images of a task must agree"
                )
            xs.append(img)
            ys.append(label)
    return np.stack(xs), np.asarray(ys, dtype=np.int64), classes


def _read_image_task(path: Path, kind: str) -> SiteTask:
    if kind != "classification":
        raise DataFormatError(
            f"task folder '{path}' is an image folder, which only classification sites can hold; "
            f"set 'kind: classification' in site.yaml ({_HINT})"
        )
    subdirs = {d.name for d in path.iterdir() if d.is_dir()}
    if subdirs == {"support", "query"}:
        sx, sy, classes = _read_class_folders(path / "support")
        qx, qy, _ = _read_class_folders(path / "query", classes)
        if sx.shape[1:] != qx.shape[1:]:
            raise DataFormatError(
                f"task folder '{path}': support images have shape {sx.shape[1:]} but query images {qx.shape[1:]}"
            )
        return SiteTask(path.name, path, support=(sx, sy), query=(qx, qy), classes=classes)
    x, y, classes = _read_class_folders(path)
    return SiteTask(path.name, path, x=x, y=y, classes=classes)


def _eligible_classes(
    labels_s: np.ndarray, labels_q: np.ndarray, shots: int, query: int, *, shared: bool
) -> np.ndarray:
    """The labels (sorted) with enough examples for an episode's ``shots`` support and ``query`` queries.

    Args:
        labels_s, labels_q: the labels of the support and query sides (the same array when ``shared``).
        shots, query: examples an episode takes per class from each side.
        shared: whether both sides draw from one pool (an ``x``/``y`` task), which then needs
            ``shots + query`` examples of a class.

    Counted by value (not ``np.bincount``), so any integer labels work, negative or huge ones too.
    """
    values_s, counts_s = np.unique(labels_s, return_counts=True)
    if shared:
        return values_s[counts_s >= shots + query]
    values_q, counts_q = np.unique(labels_q, return_counts=True)
    ok_s = values_s[counts_s >= shots]
    return np.intersect1d(ok_s, values_q[counts_q >= query])


def _split_by_fraction(task: SiteTask, fraction: float, kind: str) -> SiteTask:
    """Turn an ``x``/``y`` task into a declared split with ``fraction`` of its examples as query.

    The permutation is a function of the task's name only, so every run (and every node of a
    deployment) sees the same split.
    """
    if task.x is None or task.y is None:
        return task
    gen = torch.Generator().manual_seed(derive_seed(0, "site-split", task.name))
    n = task.x.shape[0]
    perm = torch.randperm(n, generator=gen).numpy()
    if kind == "classification":
        query_idx = []
        for cls in np.unique(task.y):
            members = perm[task.y[perm] == cls]
            k = int(round(fraction * len(members)))
            k = min(max(k, 1), len(members) - 1) if len(members) > 1 else 0
            query_idx.extend(members[:k].tolist())
        is_query = np.zeros(n, dtype=bool)
        is_query[query_idx] = True
    else:
        k = min(max(int(round(fraction * n)), 1), n - 1) if n > 1 else 0
        is_query = np.zeros(n, dtype=bool)
        is_query[perm[:k]] = True
    if not is_query.any() or is_query.all():
        raise DataFormatError(
            f"task file '{task.path}' has {n} examples: too few to split with query_fraction {fraction}"
        )
    support = (task.x[~is_query], task.y[~is_query])
    query = (task.x[is_query], task.y[is_query])
    return SiteTask(task.name, task.path, support=support, query=query, classes=task.classes)


def _site_meta(site: Path) -> dict[str, object]:
    meta = site / "site.yaml"
    if not meta.exists():
        return {}
    try:
        data = yaml.safe_load(meta.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise DataFormatError(f"site file '{meta}' is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise DataFormatError(f"site file '{meta}' must hold a mapping")
    kind = data.get("kind", "")
    if kind and kind not in SITE_KINDS:
        raise DataFormatError(f"site file '{meta}': kind must be one of {', '.join(SITE_KINDS)}, got {kind!r}")
    frac = data.get("query_fraction")
    if frac is not None and (isinstance(frac, bool) or not isinstance(frac, (int, float)) or not 0 < frac < 1):
        raise DataFormatError(
            f"site file '{meta}': query_fraction must be a number strictly between 0 and 1, got {frac!r}"
        )
    return data


def _site_kind(site: Path) -> str:
    declared = str(_site_meta(site).get("kind", "") or "")
    if declared:
        return declared
    # a site made only of image folders can only be a classification site
    tasks = site / "tasks"
    if tasks.is_dir() and any(d.is_dir() for d in tasks.iterdir()) and not any(tasks.glob("*.npz")):
        return "classification"
    return ""


def load_site_tasks(site: str | Path, subdir: str = "tasks", *, kind: str | None = None) -> list[SiteTask]:
    """Read every task of one site folder.

    Args:
        site: the site folder.
        subdir: ``"tasks"`` (training tasks) or ``"heldout"``.
        kind: expected kind; if ``None`` it comes from ``site.yaml`` or defaults to regression.

    Returns:
        The tasks sorted by file name.

    Raises:
        DataFormatError: naming the folder or file that does not match the format.
    """
    root = Path(site)
    if not root.is_dir():
        raise DataFormatError(f"site folder '{root}' does not exist or is not a folder ({_HINT})")
    declared = _site_kind(root)
    if kind is not None and declared and declared != kind:
        raise DataFormatError(f"site folder '{root}' declares kind '{declared}' but '{kind}' was expected")
    kind = kind or declared or "regression"
    folder = root / subdir
    if not folder.is_dir():
        raise DataFormatError(f"site folder '{root}' has no '{subdir}/' folder of task files ({_HINT})")
    files = sorted(p for p in folder.iterdir() if (p.is_file() and p.suffix == ".npz") or p.is_dir())
    if not files:
        raise DataFormatError(f"folder '{folder}' holds no .npz task files or image-task folders ({_HINT})")
    tasks = [_read_image_task(p, kind) if p.is_dir() else _read_task(p, kind) for p in files]
    fraction = _site_meta(root).get("query_fraction")
    if fraction is not None:
        tasks = [_split_by_fraction(t, float(fraction), kind) for t in tasks]  # type: ignore[arg-type]
    shapes = {t.input_shape for t in tasks}
    if len(shapes) != 1:
        raise DataFormatError(f"tasks in '{folder}' have different input shapes {sorted(shapes)}; they must agree")
    if kind == "regression":
        outputs = {_targets(t).shape[1:] for t in tasks}
        if len(outputs) != 1:
            raise DataFormatError(
                f"tasks in '{folder}' have targets of different shapes {sorted(outputs)}; they must agree"
            )
    return tasks


def _targets(task: SiteTask) -> np.ndarray:
    """A task's targets (``y``, or its support side's)."""
    return task.y if task.y is not None else task.support[1]  # type: ignore[index]


def list_sites(root: str | Path) -> list[Path]:
    """Return the site folders under ``root`` (``site-*`` sorted), or ``[root]`` if it is a site."""
    base = Path(root)
    if not base.is_dir():
        raise DataFormatError(f"data folder '{base}' does not exist or is not a folder ({_HINT})")
    if (base / "tasks").is_dir():
        return [base]
    sites = sorted(p for p in base.iterdir() if p.is_dir() and (p / "tasks").is_dir())
    if not sites:
        raise DataFormatError(
            f"data folder '{base}' is neither a site (no tasks/ folder) nor a folder of sites ({_HINT})"
        )
    return sites


def write_site(
    site: str | Path,
    tasks: list[tuple[str, np.ndarray, np.ndarray]],
    *,
    kind: str,
    heldout: list[tuple[str, np.ndarray, np.ndarray]] | None = None,
    name: str | None = None,
) -> Path:
    """Write a site folder in the documented format (used by ``make-data`` and tests)."""
    root = Path(site)
    if kind not in SITE_KINDS:
        raise ValueError(f"kind must be one of {SITE_KINDS}, got {kind!r}")
    for sub, items in (("tasks", tasks), ("heldout", heldout or [])):
        if not items:
            continue
        (root / sub).mkdir(parents=True, exist_ok=True)
        for task_name, x, y in items:
            np.savez(root / sub / f"{task_name}.npz", x=x, y=y)
    (root / "site.yaml").write_text(yaml.safe_dump({"kind": kind, "name": name or root.name}), encoding="utf-8")
    return root


class FolderFamily(TaskFamily):
    """Tasks read from one site folder; each draw is a fresh support/query split of a stored task.

    Task parameters are the indices of the stored tasks (``[n, 1]``). ``"train"`` draws from
    ``tasks/``, ``"eval"`` from ``heldout/`` (an error if the site has none). When more tasks are
    requested than the site stores, tasks repeat with new support/query draws (episodes).
    """

    name = "folder"
    site_data = True

    @classmethod
    def from_config(cls, cfg: Config, *, site: str | Path | None = None) -> TaskFamily:
        """The site folder ``site`` (default: ``task.data_dir``) with ``task.shots``/``query``/``ways``.

        A ``task.data_dir`` in the class-folder split layout (``train/``, ``test/``: see
        :mod:`fedmeta.tasks.class_folders`) gives its whole ``train`` split instead.

        Raises:
            ConfigError: if neither ``site`` nor ``task.data_dir`` names a folder.
            DataFormatError: if the folder does not match docs/data-format.md.
        """
        t = cfg.task
        where = site if site is not None else t.data_dir
        if where is None:
            raise ConfigError("config key 'task.data_dir' must name a site folder for task.name 'folder'")
        if site is None:
            from fedmeta.tasks.class_folders import build_class_tree_family, is_class_tree

            if is_class_tree(where):
                return build_class_tree_family(cfg)
        return cls(where, shots=t.shots, query=t.query, ways=t.ways)

    @classmethod
    def for_client(cls, cfg: Config, client_id: int) -> TaskFamily:
        """Client ``client_id``'s share of a class-folder tree's ``train`` classes (``task.partition``).

        Site folders have no shares (each client reads its own site); only a class-folder tree does.
        """
        from fedmeta.tasks.class_folders import build_class_tree_family

        return build_class_tree_family(cfg, client_id=client_id)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """When selected and the server evaluates, ``task.data_dir`` must name the site folder(s)."""
        t = cfg.task
        if cfg.eval.data_dir:
            require(
                t.name == cls.name,
                "eval.data_dir",
                cfg.eval.data_dir,
                f"applies to task.name 'folder' only (task.name is '{t.name}')",
            )
            require(
                not t.data_dir or Path(t.data_dir).resolve() != Path(cfg.eval.data_dir).resolve(),
                "eval.data_dir",
                cfg.eval.data_dir,
                "must be a folder no client reads, not task.data_dir itself",
            )
        if t.name == cls.name and cfg.eval.server and not cfg.eval.data_dir:
            # A deployment server without site data (each SuperNode has its own data-dir) leaves it
            # null; it then evaluates only through the sites (eval.server false, eval.clients > 0).
            require(
                bool(t.data_dir),
                "task.data_dir",
                t.data_dir,
                "must name a site folder for task.name 'folder' (a deployment server without data: "
                "set eval.server false and eval.clients > 0)",
            )

    def __init__(self, site: str | Path, *, shots: int, query: int, ways: int = 5, kind: str | None = None) -> None:
        self.site = Path(site)
        self.shots, self.query, self.ways = shots, query, ways
        self.kind = kind or _site_kind(self.site) or "regression"
        self._tasks: dict[str, list[SiteTask]] = {"train": load_site_tasks(self.site, "tasks", kind=self.kind)}
        if (self.site / "heldout").is_dir():
            self._tasks["eval"] = load_site_tasks(self.site, "heldout", kind=self.kind)
        first = self._tasks["train"][0]
        self.input_shape = first.input_shape
        if self.kind == "classification":
            self.output_dim = ways
        else:
            self.output_dim = int(_targets(first).shape[1])
        for held in self._tasks.get("eval", [])[:1]:
            if held.input_shape != first.input_shape or (
                self.kind == "regression" and _targets(held).shape[1:] != _targets(first).shape[1:]
            ):
                raise DataFormatError(
                    f"site folder '{self.site}': its heldout/ tasks have another input or target shape than its "
                    f"tasks/ ({_HINT})"
                )
        for t in self._tasks["train"]:
            self._check_size(t)
        for t in self._tasks.get("eval", []):
            self._check_size(t)

    def tasks(self, split: str = "train") -> list[SiteTask]:
        """The stored tasks of ``split``."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split not in self._tasks:
            raise DataFormatError(f"site folder '{self.site}' has no heldout/ folder to evaluate on ({_HINT})")
        return self._tasks[split]

    def _check_size(self, task: SiteTask) -> None:
        need_s, need_q = self.shots, self.query
        if self.kind == "classification":
            labels_s = task.y if task.y is not None else task.support[1]  # type: ignore[index]
            labels_q = task.y if task.y is not None else task.query[1]  # type: ignore[index]
            usable = len(_eligible_classes(labels_s, labels_q, need_s, need_q, shared=task.y is not None))
            if usable < self.ways:
                raise TooFewClassesError(
                    f"task file '{task.path}' has only {usable} classes with enough examples for "
                    f"{self.ways}-way {need_s}-shot episodes with {need_q} queries per class"
                )
            return
        if task.x is not None:
            if task.x.shape[0] < need_s + need_q:
                raise DataFormatError(
                    f"task file '{task.path}' has {task.x.shape[0]} examples; an episode of {need_s} support "
                    f"(shots) + {need_q} query examples needs {need_s + need_q}"
                )
        else:
            have_s, have_q = task.support[0].shape[0], task.query[0].shape[0]  # type: ignore[index]
            if have_s < need_s or have_q < need_q:
                raise DataFormatError(
                    f"task file '{task.path}' declares {have_s} support and {have_q} query examples; "
                    f"{need_s} support (shots) and {need_q} query examples are needed"
                )

    def sample_params(self, gen: torch.Generator, n: int, split: str) -> Tensor:
        count = len(self.tasks(split))
        if n <= count:
            idx = torch.randperm(count, generator=gen)[:n]
        else:
            idx = torch.randint(count, (n,), generator=gen)
        # the split rides along in the second column so that make_tasks knows where to look
        return torch.stack([idx.float(), torch.full((n,), float(SPLITS.index(split)))], dim=1)

    def make_tasks(self, params: Tensor, gen: torch.Generator) -> TaskBatch:
        sx, sy, qx, qy, names = [], [], [], [], []
        for idx, split_id in params.tolist():
            task = self.tasks(SPLITS[int(split_id)])[int(idx)]
            a, b, c, d = self._episode(task, gen)
            sx.append(a)
            sy.append(b)
            qx.append(c)
            qy.append(d)
            names.append(task.name)
        return TaskBatch(
            torch.stack(sx), torch.stack(sy), torch.stack(qx), torch.stack(qy), self.kind, params, tuple(names)
        )

    def _episode(self, task: SiteTask, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        if self.kind == "classification":
            return self._class_episode(task, gen)
        if task.x is not None:
            perm = torch.randperm(task.x.shape[0], generator=gen).numpy()
            x, y = torch.from_numpy(task.x[perm]), torch.from_numpy(task.y[perm])  # type: ignore[index]
            s, q = self.shots, self.query
            return x[:s], y[:s], x[s : s + q], y[s : s + q]
        (ax, ay), (bx, by) = task.support, task.query  # type: ignore[misc]
        ps = torch.randperm(ax.shape[0], generator=gen)[: self.shots].numpy()
        pq = torch.randperm(bx.shape[0], generator=gen)[: self.query].numpy()
        return (torch.from_numpy(ax[ps]), torch.from_numpy(ay[ps]), torch.from_numpy(bx[pq]), torch.from_numpy(by[pq]))

    def _class_episode(self, task: SiteTask, gen: torch.Generator) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        s, q = self.shots, self.query
        if task.x is not None:
            assert task.y is not None  # x and y are read together (see _read_task)
            pools_s = pools_q = task.x
            labels_s = labels_q = task.y
        else:
            (pools_s, labels_s), (pools_q, labels_q) = task.support, task.query  # type: ignore[misc]
        eligible = _eligible_classes(labels_s, labels_q, s, q, shared=task.x is not None)
        chosen = eligible[torch.randperm(len(eligible), generator=gen)[: self.ways].numpy()]
        xs, ys, xq, yq = [], [], [], []
        for new_label, cls in enumerate(chosen):
            idx_s = np.flatnonzero(labels_s == cls)
            idx_s = idx_s[torch.randperm(len(idx_s), generator=gen).numpy()]
            if task.x is not None:
                take_s, take_q = idx_s[:s], idx_s[s : s + q]
            else:
                idx_q = np.flatnonzero(labels_q == cls)
                idx_q = idx_q[torch.randperm(len(idx_q), generator=gen).numpy()]
                take_s, take_q = idx_s[:s], idx_q[:q]
            xs.append(pools_s[take_s])
            xq.append(pools_q[take_q])
            ys.append(np.full(len(take_s), new_label))
            yq.append(np.full(len(take_q), new_label))
        return (
            torch.from_numpy(np.concatenate(xs)),
            torch.from_numpy(np.concatenate(ys)).long(),
            torch.from_numpy(np.concatenate(xq)),
            torch.from_numpy(np.concatenate(yq)).long(),
        )
