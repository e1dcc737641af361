"""The ``omniglot`` task family: Omniglot (Lake et al., 2015) read from its own layout on disk.

``task.data_dir`` is the folder that holds Omniglot's two halves as the dataset ships them::

    images_background/<alphabet>/<character>/*.png    (30 alphabets: meta-training)
    images_evaluation/<alphabet>/<character>/*.png    (20 alphabets: held out)

Each character is a class, each PNG (105x105, black strokes on white) one drawing of it. Images
are inverted to the glyphs' convention (white strokes on black), box-resized to
``task.image_size`` and kept as a ``uint8`` bank, which is cached as an ``.npz`` under the cache
folder (``task.cache_dir``), keyed by the tree's file list, sizes and modification times, so a
second load reads one file. Episodes, rotations as classes (``task.rotations``) and the client
partitions (``task.partition``: ``script`` = one background alphabet per client, ``dirichlet``,
``iid``) are the glyph family's (:class:`fedmeta.tasks.glyphs.GlyphFamily`) over this catalog;
``style`` has no meaning here (Omniglot has no font faces) and is refused. See
``docs/data-format.md``.

Every character must have at least ``task.shots + task.query`` drawings; a bank holds the same
number per character (the smallest count in the tree; Omniglot has 20 everywhere), the first
ones in file-name order.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fedmeta.config import Config
from fedmeta.errors import ConfigError, DataFormatError
from fedmeta.registry import require
from fedmeta.tasks.base import TaskFamily
from fedmeta.tasks.glyphs.cache import cache_dir, cached_bank, write_atomic
from fedmeta.tasks.glyphs.catalog import AlphabetSplits
from fedmeta.tasks.glyphs.family import GlyphFamily

__all__ = [
    "OMNIGLOT_FOLDERS",
    "OMNIGLOT_PARTITIONS",
    "OmniglotCatalog",
    "OmniglotFamily",
    "build_omniglot_family",
    "load_omniglot_bank",
    "read_omniglot_image",
    "scan_omniglot",
]

log = logging.getLogger(__name__)

#: The folder of each task-family split, as Omniglot ships them.
OMNIGLOT_FOLDERS = {"train": "images_background", "eval": "images_evaluation"}
#: The glyph partitions that make sense for Omniglot (``style`` is a font face, which it lacks).
OMNIGLOT_PARTITIONS = ("iid", "script", "dirichlet")
#: Bumped whenever the resizing changes, so that old cache files are never reused.
BANK_FORMAT = 1


def _entries(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


@dataclass(frozen=True)
class OmniglotCatalog(AlphabetSplits):
    """The characters of an Omniglot tree (row ``i`` is class ``i``), in the shape of a glyph catalog
    (the shared arrays as in :class:`~fedmeta.tasks.glyphs.catalog.AlphabetSplits`).

    Attributes:
        root: the tree (``task.data_dir``).
        characters: ``'<alphabet>/<character>'`` of each class.
        files: the drawings of each class used by the bank (``drawings`` files, by name).
        drawings: drawings per class in the bank.
        alphabet_names: alphabet folder names, background ones first, each half sorted.
        evaluation_alphabets: boolean ``[A]``, True for the alphabets of ``images_evaluation``.
        style_mask: ``[C]`` all ones (one "face").
        rotation_mask: ``[C]`` all quarter turns distinct (Omniglot's rotation augmentation).
        digest: SHA-256 of the tree's file list, sizes and modification times.
    """

    root: Path
    characters: tuple[str, ...]
    files: tuple[tuple[Path, ...], ...]
    drawings: int

    def __len__(self) -> int:
        return len(self.characters)

    def class_name(self, cls: int) -> str:
        """``'<alphabet>/<character>'``."""
        return self.characters[cls]


def scan_omniglot(root: str | Path, *, min_drawings: int) -> OmniglotCatalog:
    """List the characters and drawings of an Omniglot tree (no image is decoded).

    Args:
        root: the folder holding ``images_background`` and ``images_evaluation``.
        min_drawings: drawings every character needs (``task.shots + task.query``).

    Returns:
        The catalog; the bank keeps ``drawings`` = the smallest count in the tree per class.

    Raises:
        DataFormatError: naming the folder that is missing or empty, or the character folder
            with fewer than ``min_drawings`` PNG files.
    """
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataFormatError(f"Omniglot folder '{base}' (task.data_dir) does not exist or is not a folder")
    characters: list[str] = []
    files: list[list[Path]] = []
    alphabet: list[int] = []
    names: list[str] = []
    evaluation: list[bool] = []
    listing = hashlib.sha256()
    for split, sub in OMNIGLOT_FOLDERS.items():
        half = base / sub
        if not half.is_dir():
            raise DataFormatError(
                f"Omniglot folder '{base}' lacks its '{sub}' folder (expected {half}/<alphabet>/<character>/*.png)"
            )
        alphabets = [a for a in _entries(half) if a.is_dir()]
        if not alphabets:
            raise DataFormatError(f"Omniglot folder '{half}' holds no alphabet folders")
        for folder in alphabets:
            chars = [c for c in _entries(folder) if c.is_dir()]
            if not chars:
                raise DataFormatError(f"Omniglot alphabet folder '{folder}' holds no character folders")
            index = len(names)
            names.append(folder.name)
            evaluation.append(split == "eval")
            for char in chars:
                pngs = [p for p in _entries(char) if p.suffix.lower() == ".png" and p.is_file()]
                if len(pngs) < min_drawings:
                    raise DataFormatError(
                        f"Omniglot character folder '{char}' has {len(pngs)} PNG drawings, fewer than "
                        f"task.shots + task.query ({min_drawings})"
                    )
                for p in pngs:
                    st = p.stat()
                    listing.update(f"{p.relative_to(base).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
                characters.append(f"{folder.name}/{char.name}")
                files.append(pngs)
                alphabet.append(index)
    drawings = min(len(f) for f in files)
    if any(len(f) != drawings for f in files):
        log.warning(
            "Omniglot characters in '%s' have different numbers of drawings; using the first %d of each",
            base,
            drawings,
        )
    n = len(characters)
    return OmniglotCatalog(
        root=base,
        characters=tuple(characters),
        files=tuple(tuple(f[:drawings]) for f in files),
        drawings=drawings,
        alphabet=np.array(alphabet, dtype=np.int64),
        alphabet_names=tuple(names),
        evaluation_alphabets=np.array(evaluation, dtype=bool),
        style_mask=np.ones(n, dtype=np.int64),
        rotation_mask=np.full(n, 0b1111, dtype=np.int64),
        digest=listing.hexdigest(),
    )


def read_omniglot_image(path: str | Path, image_size: int) -> np.ndarray:
    """One drawing as ``uint8 [image_size, image_size]``, ink 255 (inverted, box-resized).

    Raises:
        DataFormatError: naming the file if it cannot be decoded as an image.
    """
    from PIL import Image, ImageOps, UnidentifiedImageError

    p = Path(path)
    try:
        with Image.open(p) as img:
            img.load()
            gray = ImageOps.invert(img.convert("L"))
    except (OSError, UnidentifiedImageError, ValueError) as exc:
        raise DataFormatError(f"Omniglot image '{p}' cannot be read as an image: {exc}") from exc
    # BOX averages each output pixel's exact footprint: the antialiased shrink of the glyph renderer
    small = gray.resize((image_size, image_size), Image.Resampling.BOX)
    return np.asarray(small, dtype=np.uint8)


def _bank_key(catalog: OmniglotCatalog, image_size: int) -> str:
    return json.dumps(
        {
            "format": BANK_FORMAT,
            "tree": catalog.digest,
            "classes": len(catalog),
            "drawings": catalog.drawings,
            "image_size": int(image_size),
        },
        sort_keys=True,
    )


def _read_cached(path: Path, key: str, shape: tuple[int, ...]) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as data:
            if str(data["key"]) != key:
                raise ValueError("written for a different tree or size")
            images = np.asarray(data["images"])
    except (OSError, KeyError, ValueError) as exc:
        raise ValueError(f"{type(exc).__name__}: {exc}") from exc
    if images.shape != shape or images.dtype != np.uint8:
        raise ValueError(f"holds {images.dtype} {images.shape}, expected uint8 {shape}")
    return images


def _write_cached(path: Path, key: str, images: np.ndarray) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, key=np.array(key), images=images)
    write_atomic(path, buffer.getvalue())


def load_omniglot_bank(catalog: OmniglotCatalog, *, image_size: int, folder: Path) -> np.ndarray:
    """All drawings of the tree as ``uint8 [classes, drawings, image_size, image_size]`` (ink 255).

    Read from ``folder`` if a cached bank for the same tree contents and size verifies; else
    decoded, resized and cached there (a cache that cannot be written only costs the caching).

    Raises:
        DataFormatError: naming a PNG that cannot be decoded.
    """
    key = _bank_key(catalog, image_size)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    shape = (len(catalog), catalog.drawings, image_size, image_size)

    def decode() -> np.ndarray:
        started = time.perf_counter()
        images = np.empty(shape, dtype=np.uint8)
        for c, drawings in enumerate(catalog.files):
            for d, png in enumerate(drawings):
                images[c, d] = read_omniglot_image(png, image_size)
        log.info(
            "read %d Omniglot drawings from %s in %.1f s",
            images.shape[0] * images.shape[1],
            catalog.root,
            time.perf_counter() - started,
        )
        return images

    return cached_bank(
        folder / f"omniglot-{image_size}px-{catalog.drawings}x-{digest}.npz",
        read=lambda path: _read_cached(path, key, shape),
        make=decode,
        write=lambda path, images: _write_cached(path, key, images),
        what="Omniglot",
        remake="reading the tree again",
        logger=log,
    )


class OmniglotFamily(GlyphFamily):
    """N-way K-shot episodes over an Omniglot tree on disk (the glyph family's episodes and partitions)."""

    name = "omniglot"
    models = ("conv4",)
    kind = "classification"

    @classmethod
    def build(cls, cfg: Config, client_id: int | None = None) -> TaskFamily:
        """The whole tree, or client ``client_id``'s partition of the background alphabets
        (:func:`build_omniglot_family`)."""
        return build_omniglot_family(cfg, client_id)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """When selected: a partition Omniglot has (not ``style``). The shared image keys are the glyphs'."""
        t = cfg.task
        if t.name == cls.name:
            require(
                t.partition in OMNIGLOT_PARTITIONS,
                "task.partition",
                t.partition,
                f"must be one of {', '.join(OMNIGLOT_PARTITIONS)} for task.name 'omniglot' "
                "('style' splits by font face, which Omniglot drawings do not have)",
            )


def build_omniglot_family(cfg: Config, client_id: int | None = None) -> OmniglotFamily:
    """The omniglot family of a config: the whole tree, or one federated client's share.

    Args:
        cfg: the run configuration (``task.data_dir`` names the tree).
        client_id: ``None`` for every background alphabet, else the client whose
            ``task.partition`` share of them it trains on.

    Raises:
        ConfigError: if ``task.data_dir`` is unset, or a partition or split is too small for
            ``task.ways``.
        DataFormatError: if the tree does not match Omniglot's layout (naming the folder or file).
    """
    t = cfg.task
    if t.data_dir is None:
        raise ConfigError(
            "config key 'task.data_dir' must name the folder holding images_background and images_evaluation "
            "for task.name 'omniglot'"
        )
    catalog = scan_omniglot(t.data_dir, min_drawings=t.shots + t.query)
    bank = load_omniglot_bank(catalog, image_size=t.image_size, folder=cache_dir(t.cache_dir).parent / "omniglot")
    # Omniglot has one face: check_config refuses the style partition, so client_classes gives no face
    return OmniglotFamily.from_catalog(
        cfg, catalog, client_id, drawings=catalog.drawings, bank=lambda rows, _: bank[rows]
    )
