"""The stored character list of the glyphs benchmark (``fedmeta/data/glyphs.json``).

The list is committed data, produced once by ``simulations/build_glyph_list.py``; it is read
here and never recomputed at run time. Each character ("class") has an alphabet (a Unicode
script, or a symbol block), the font styles it is rendered in, and the 90-degree rotations that
may serve as extra background classes. Alphabets are split into *background* (meta-training)
and *evaluation* (held out), like Omniglot's 30 and 20 alphabets.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Protocol

import numpy as np

from fedmeta.errors import DataFormatError
from fedmeta.tasks.glyphs.render import STYLES

__all__ = ["ClassCatalog", "AlphabetSplits", "GlyphCatalog", "load_catalog", "CATALOG_SPLITS"]

#: The two halves of the alphabet split, and the task-family split each one serves.
CATALOG_SPLITS = {"train": "background", "eval": "evaluation"}


class ClassCatalog(Protocol):
    """What episodes and client partitions need of a character table (glyphs, Omniglot).

    Row ``i`` is class ``i``; :attr:`alphabet` indexes :attr:`alphabet_names`; the masks are as in
    :class:`GlyphCatalog`.
    """

    @property
    def alphabet(self) -> np.ndarray:
        """``[C]`` alphabet index of each class."""
        ...

    @property
    def alphabet_names(self) -> tuple[str, ...]:
        """Names of the alphabets."""
        ...

    @property
    def evaluation_alphabets(self) -> np.ndarray:
        """Boolean ``[A]``, True for held-out alphabets."""
        ...

    @property
    def style_mask(self) -> np.ndarray:
        """``[C]`` bit ``s`` set if face ``s`` has the class."""
        ...

    @property
    def rotation_mask(self) -> np.ndarray:
        """``[C]`` bit ``k`` set if the turn by ``k * 90`` degrees is a distinct class."""
        ...

    def __len__(self) -> int: ...

    def split_classes(self, split: str) -> np.ndarray:
        """Class indices of ``"train"`` (background alphabets) or ``"eval"`` (evaluation alphabets)."""
        ...

    def rotations_of(self, cls: int) -> list[int]:
        """Quarter turns (0-3) that are distinct classes for ``cls`` (always includes 0)."""
        ...

    def alphabets(self, split: str) -> list[int]:
        """Alphabet indices of a split."""
        ...

    def class_name(self, cls: int) -> str:
        """A short name of class ``cls`` as episodes describe it."""
        ...


@dataclass(frozen=True)
class AlphabetSplits:
    """The arrays every :class:`ClassCatalog` has, and the split, rotation and alphabet queries on them.

    Shared by every catalog (the glyph list, an Omniglot tree): they differ in where their
    classes come from, not in how alphabets split them. Row ``i`` is class ``i``.

    Attributes:
        alphabet: ``[C]`` index into :attr:`alphabet_names`.
        alphabet_names: names of the alphabets.
        evaluation_alphabets: boolean ``[A]``, True for held-out alphabets.
        style_mask: ``[C]`` bit ``s`` set if face ``s`` has the class.
        rotation_mask: ``[C]`` bit ``k`` set if the turn by ``k * 90`` degrees is a distinct class.
        digest: SHA-256 of what the catalog was read from (part of every cache key).
    """

    alphabet: np.ndarray
    alphabet_names: tuple[str, ...]
    evaluation_alphabets: np.ndarray
    style_mask: np.ndarray
    rotation_mask: np.ndarray
    digest: str

    @property
    def is_evaluation(self) -> np.ndarray:
        """Boolean ``[C]``: the class belongs to an evaluation alphabet."""
        return self.evaluation_alphabets[self.alphabet]

    def split_classes(self, split: str) -> np.ndarray:
        """Class indices of ``"train"`` (background alphabets) or ``"eval"`` (evaluation alphabets).

        Raises:
            ValueError: for another split name.
        """
        if split not in CATALOG_SPLITS:
            raise ValueError(f"split must be one of {tuple(CATALOG_SPLITS)}, got {split!r}")
        mask = self.is_evaluation if split == "eval" else ~self.is_evaluation
        return np.flatnonzero(mask)

    def rotations_of(self, cls: int) -> list[int]:
        """Quarter turns (0-3) that are distinct classes for ``cls`` (always includes 0)."""
        mask = int(self.rotation_mask[cls])
        return [k for k in range(4) if mask >> k & 1]

    def alphabets(self, split: str) -> list[int]:
        """Alphabet indices of a split, sorted by name."""
        want = split == "eval"
        return [a for a in range(len(self.alphabet_names)) if bool(self.evaluation_alphabets[a]) == want]


@dataclass(frozen=True)
class GlyphCatalog(AlphabetSplits):
    """The character table as arrays (row ``i`` is class ``i``); the shared arrays as in :class:`AlphabetSplits`.

    Attributes:
        codepoints: ``[C]`` Unicode code points.
        style_mask: ``[C]`` bit ``s`` set if style ``s`` (:data:`render.STYLES`) renders the class.
        digest: SHA-256 of the stored table.
    """

    codepoints: np.ndarray

    def __len__(self) -> int:
        return int(self.codepoints.shape[0])

    def styles_of(self, cls: int) -> list[int]:
        """Style indices a class is rendered in."""
        mask = int(self.style_mask[cls])
        return [s for s in range(len(STYLES)) if mask >> s & 1]

    def class_name(self, cls: int) -> str:
        """``'U+0531'``: the code point of class ``cls``."""
        return f"U+{int(self.codepoints[cls]):04X}"

    def label(self, cls: int) -> str:
        """A short human-readable name of a class, e.g. ``'Ա U+0531 Armenian'``."""
        cp = int(self.codepoints[cls])
        return f"{chr(cp)} U+{cp:04X} {self.alphabet_names[int(self.alphabet[cls])]}"


def _default_path() -> Path:
    return Path(str(resources.files("fedmeta") / "data" / "glyphs.json"))


def load_catalog(path: str | Path | None = None) -> GlyphCatalog:
    """Read and check the stored glyph list.

    Args:
        path: a glyph list file; defaults to the one shipped in ``fedmeta/data``.

    Raises:
        DataFormatError: if the file is missing, not valid JSON, or inconsistent (the message
            names the file).
    """
    p = Path(path) if path is not None else _default_path()
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataFormatError(f"glyph list '{p}' cannot be read: {exc}") from exc
    try:
        if doc["columns"] != ["codepoint", "char", "alphabet", "style_mask", "rotation_mask"]:
            raise DataFormatError(f"glyph list '{p}' has unexpected columns {doc['columns']}")
        if [s["file"] for s in doc["styles"]] != [s.file for s in STYLES]:
            raise DataFormatError(f"glyph list '{p}' lists font styles that differ from fedmeta's")
        names = tuple(a["name"] for a in doc["alphabets"])
        index = {n: i for i, n in enumerate(names)}
        rows = doc["glyphs"]
        table = json.dumps(rows, ensure_ascii=True).encode()
        digest = hashlib.sha256(table).hexdigest()
        if digest != doc["glyphs_sha256"]:
            raise DataFormatError(f"glyph list '{p}' does not match its recorded checksum (edited by hand?)")
        catalog = GlyphCatalog(
            codepoints=np.array([r[0] for r in rows], dtype=np.int64),
            alphabet=np.array([index[r[2]] for r in rows], dtype=np.int64),
            alphabet_names=names,
            evaluation_alphabets=np.array([a["split"] == "evaluation" for a in doc["alphabets"]]),
            style_mask=np.array([r[3] for r in rows], dtype=np.int64),
            rotation_mask=np.array([r[4] for r in rows], dtype=np.int64),
            digest=digest,
        )
    except (KeyError, TypeError, IndexError) as exc:
        raise DataFormatError(f"glyph list '{p}' is malformed: {exc!r}") from exc
    if len(set(catalog.codepoints.tolist())) != len(catalog):
        raise DataFormatError(f"glyph list '{p}' repeats a code point")
    if np.any(catalog.style_mask <= 0) or np.any(catalog.rotation_mask & 1 == 0):
        raise DataFormatError(f"glyph list '{p}' has a class with no style or without its unrotated form")
    return catalog
