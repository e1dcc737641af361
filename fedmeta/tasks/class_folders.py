"""Class-folder image sets in the mini-ImageNet split layout, read by the ``folder`` family.

``task.data_dir`` names a tree (``docs/data-format.md``)::

    ROOT/train/<class>/*.jpg|png|...   meta-training classes
    ROOT/val/<class>/...               optional; not read (model selection is the user's)
    ROOT/test/<class>/...              held-out classes: every "eval" episode comes from them

A folder with ``train/`` and no ``tasks/`` is such a tree (a site folder has ``tasks/``). Every
image is converted to grayscale (all files grayscale) or RGB (any colour file), box-resized to
``task.image_size`` and cached as one ``.npz`` under the cache folder (``task.cache_dir``), keyed
by the tree's file list, sizes and modification times. Episodes are ``task.ways``-way over the
classes of one split (:class:`fedmeta.tasks.labelled.PoolFamily`). Federated client ``c`` holds a
share of the ``train`` classes by ``task.partition``: ``iid`` (every class) or ``dirichlet``
(class preferences ``~ Dir(task.dirichlet_alpha)``, the glyphs' partition with each class its own
"alphabet").
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmeta.config import Config
from fedmeta.errors import ConfigError, DataFormatError
from fedmeta.tasks.glyphs.cache import cache_dir
from fedmeta.tasks.glyphs.catalog import CATALOG_SPLITS
from fedmeta.tasks.glyphs.partition import client_partition
from fedmeta.tasks.labelled import ImagePool, PoolFamily, cached_pool, resize_image

__all__ = [
    "CLASS_SPLITS",
    "CLASS_TREE_PARTITIONS",
    "ClassTree",
    "ClassTreeFamily",
    "build_class_tree_family",
    "is_class_tree",
    "scan_class_tree",
]

log = logging.getLogger(__name__)

#: The folder of each task-family split (``val/`` may exist and is not read).
CLASS_SPLITS = {"train": "train", "eval": "test"}
#: The client partitions a class tree supports (it has no alphabets or font faces).
CLASS_TREE_PARTITIONS = ("iid", "dirichlet")
_GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


def is_class_tree(root: str | Path) -> bool:
    """Whether ``root`` is a class-folder tree (a ``train/`` folder, no ``tasks/`` folder)."""
    base = Path(root).expanduser()
    return (base / "train").is_dir() and not (base / "tasks").is_dir()


@dataclass(frozen=True)
class ClassTree:
    """The classes of a tree (class ``i`` is row ``i``), ``train`` classes first, each split sorted by name.

    Attributes:
        root: the tree.
        names: ``'<split>/<class>'`` of each class.
        files: the images of each class, by file name.
        evaluation: boolean ``[C]``, True for the ``test`` classes.
        digest: SHA-256 of the file list, sizes and modification times.
    """

    root: Path
    names: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]
    evaluation: np.ndarray
    digest: str

    # -- the ClassCatalog protocol, for the glyphs' client partitions (each class its own alphabet)

    @property
    def alphabet(self) -> np.ndarray:
        """``[C]`` each class is its own alphabet."""
        return np.arange(len(self.names))

    @property
    def alphabet_names(self) -> tuple[str, ...]:
        """The class names."""
        return self.names

    @property
    def evaluation_alphabets(self) -> np.ndarray:
        """True for the ``test`` classes."""
        return self.evaluation

    @property
    def style_mask(self) -> np.ndarray:
        """One "face"."""
        return np.ones(len(self.names), dtype=np.int64)

    @property
    def rotation_mask(self) -> np.ndarray:
        """No rotations."""
        return np.ones(len(self.names), dtype=np.int64)

    def __len__(self) -> int:
        return len(self.names)

    def split_classes(self, split: str) -> np.ndarray:
        """Class indices of ``"train"`` or ``"eval"`` (the ``test`` folder)."""
        if split not in CATALOG_SPLITS:
            raise ValueError(f"split must be one of {tuple(CATALOG_SPLITS)}, got {split!r}")
        return np.flatnonzero(self.evaluation if split == "eval" else ~self.evaluation)

    def rotations_of(self, cls: int) -> list[int]:
        """No rotations: only the class itself."""
        return [0]

    def alphabets(self, split: str) -> list[int]:
        """The classes of a split."""
        return self.split_classes(split).tolist()

    def class_name(self, cls: int) -> str:
        """``'<split>/<class>'``."""
        return self.names[cls]


def scan_class_tree(root: str | Path, *, min_images: int) -> ClassTree:
    """List the classes and images of a tree (no image is decoded).

    Args:
        root: the tree (``task.data_dir``).
        min_images: images every class needs (``task.shots + task.query``).

    Raises:
        DataFormatError: naming the missing split folder, an empty one, or the class folder with
            fewer than ``min_images`` images.
    """
    from fedmeta.tasks.folder import IMAGE_SUFFIXES

    base = Path(root).expanduser()
    names: list[str] = []
    files: list[tuple[Path, ...]] = []
    evaluation: list[bool] = []
    listing = hashlib.sha256()
    for split, sub in CLASS_SPLITS.items():
        folder = base / sub
        if not folder.is_dir():
            raise DataFormatError(
                f"class-folder tree '{base}' (task.data_dir) lacks its '{sub}' folder (expected {folder}/<class>/*.jpg)"
            )
        classes = sorted(d for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not classes:
            raise DataFormatError(f"class-folder tree split '{folder}' holds no class folders")
        for cls in classes:
            images = tuple(
                sorted(f for f in cls.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            )
            if len(images) < min_images:
                raise DataFormatError(
                    f"class folder '{cls}' has {len(images)} images, fewer than task.shots + task.query "
                    f"({min_images})"
                )
            for f in images:
                st = f.stat()
                listing.update(f"{f.relative_to(base).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
            names.append(f"{sub}/{cls.name}")
            files.append(images)
            evaluation.append(split == "eval")
    return ClassTree(base, tuple(names), tuple(files), np.array(evaluation, dtype=bool), listing.hexdigest())


def _read_tree(tree: ClassTree, image_size: int) -> ImagePool:
    from PIL import Image, UnidentifiedImageError

    opened: list[object] = []
    gray = True
    for images in tree.files:
        for f in images:
            try:
                with Image.open(f) as img:
                    img.load()
                    gray = gray and img.mode in _GRAY_MODES
                    opened.append(img.copy() if img.size == (image_size, image_size) else _shrink(img, image_size))
            except (OSError, UnidentifiedImageError, ValueError) as exc:
                raise DataFormatError(f"image file '{f}' cannot be read as an image: {exc}") from exc
    channels = 1 if gray else 3
    pixels = np.stack([resize_image(img, size=image_size, channels=channels) for img in opened])
    labels = np.concatenate([np.full(len(images), c, dtype=np.int64) for c, images in enumerate(tree.files)])
    return ImagePool(pixels, labels, tree.names, str(tree.root))


def _shrink(img: object, image_size: int) -> object:
    """Resize once in the file's own mode (keeping memory to the output size); channels are chosen later."""
    from PIL import Image

    assert isinstance(img, Image.Image)
    mode = img.mode if img.mode in ("L", "RGB") else ("L" if img.mode in _GRAY_MODES else "RGB")
    return img.convert(mode).resize((image_size, image_size), Image.Resampling.BOX)


class ClassTreeFamily(PoolFamily):
    """N-way K-shot episodes over a class-folder tree (built by the ``folder`` family, :func:`build_class_tree_family`).

    Attributes:
        tree: the classes and files read.
    """

    name = "folder"

    def __init__(self, tree: ClassTree, pool: ImagePool, train_classes: np.ndarray, *, what: str, **episode: int):
        self.tree = tree
        rows_train = np.flatnonzero(np.isin(pool.labels, train_classes))
        rows_eval = np.flatnonzero(np.isin(pool.labels, tree.split_classes("eval")))
        super().__init__(pool, {"train": [rows_train], "eval": [rows_eval]}, what=what, **episode)


def build_class_tree_family(cfg: Config, client_id: int | None = None) -> ClassTreeFamily:
    """The family of a class-folder tree: every ``train`` class, or client ``client_id``'s share of them.

    Raises:
        ConfigError: for a partition the tree does not support (naming ``task.partition``), or a
            share or split smaller than ``task.ways``.
        DataFormatError: naming the split folder, class folder or image that does not match.
    """
    t = cfg.task
    assert t.data_dir is not None
    tree = scan_class_tree(t.data_dir, min_images=t.shots + t.query)
    key: dict[str, object] = {"source": str(tree.root), "tree": tree.digest, "image_size": int(t.image_size)}
    pool = cached_pool(
        cache_dir(t.cache_dir).parent / "classes", "classes", key, lambda: _read_tree(tree, t.image_size)
    )
    if client_id is None:
        classes = tree.split_classes("train")
    else:
        if t.partition not in CLASS_TREE_PARTITIONS:
            raise ConfigError(
                f"config key 'task.partition' must be one of {', '.join(CLASS_TREE_PARTITIONS)} for a class-folder "
                f"tree (task.data_dir '{tree.root}' has no alphabets or faces), got {t.partition!r}"
            )
        classes, _ = client_partition(
            tree,
            t.partition,
            client_id=client_id,
            clients_total=cfg.federation.clients_total,
            ways=t.ways,
            alpha=t.dirichlet_alpha,
            seed=cfg.seed,
        )
    what = "class folder set" if client_id is None else f"class share of client {client_id} (task.partition)"
    log.debug("class tree %s: %d classes, client %s holds %d", tree.root, len(tree), client_id, classes.size)
    return ClassTreeFamily(tree, pool, classes, what=what, ways=t.ways, shots=t.shots, query=t.query)
