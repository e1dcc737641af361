"""The ``glyphs`` task family: N-way K-shot episodes over rendered characters.

An episode picks ``ways`` classes of one split (background alphabets for ``"train"``,
evaluation alphabets for ``"eval"``), relabels them ``0 .. ways-1`` in the order drawn, and
takes ``shots + query`` distinct drawings of each from the drawing bank (support first, then
query). Task parameters are the ``[n, ways]`` global class ids ``4 * character + quarter_turns``:
with ``task.rotations`` a background character turned by 90, 180 or 270 degrees is a class of its
own (the augmentation of Santoro et al. 2016 and Finn et al. 2017 on Omniglot), for the
rotations the glyph list marks as distinct. Evaluation classes are never rotated.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar, Self

import numpy as np
import torch
from torch import Tensor

from fedmeta.config import Config
from fedmeta.errors import ConfigError
from fedmeta.registry import require
from fedmeta.rng import make_generator
from fedmeta.tasks.base import SPLITS, TaskFamily
from fedmeta.tasks.folder import write_site
from fedmeta.tasks.glyphs.cache import cache_dir, load_bank
from fedmeta.tasks.glyphs.catalog import ClassCatalog, GlyphCatalog, load_catalog
from fedmeta.tasks.glyphs.partition import PARTITIONS, client_classes
from fedmeta.types import TaskBatch

__all__ = ["GlyphFamily", "BankLoader", "build_glyph_family", "make_glyph_sites", "ROTATIONS"]

log = logging.getLogger(__name__)

#: Class id = ``ROTATIONS * character + quarter_turns``.
ROTATIONS = 4

#: ``bank(characters, style)``: ``uint8 [len(characters), drawings, H, W]`` images (ink 255) of
#: catalog rows ``characters``, in one face (``style``) or mixed (``None``).
BankLoader = Callable[[np.ndarray, "int | None"], np.ndarray]


@dataclass
class _Pool:
    """Drawings of some characters: ``images[row[c]]`` are the drawings of character ``c``."""

    images: np.ndarray
    row: np.ndarray

    @classmethod
    def of(cls, images: np.ndarray, characters: np.ndarray, size: int) -> _Pool:
        row = np.full(size, -1, dtype=np.int64)
        row[characters] = np.arange(characters.shape[0])
        return cls(images, row)


class GlyphFamily(TaskFamily):
    """Few-shot classification episodes over glyph drawings.

    The episode code serves any character table with a fixed number of images per character:
    the rendered glyph list (the default bank renders and caches drawings, :mod:`.cache`), or a
    catalog read from disk with its own ``bank`` (:mod:`fedmeta.tasks.omniglot`).

    Args:
        catalog: the character table (:class:`GlyphCatalog` unless ``bank`` is given).
        train_characters: background characters this family trains on (all of them, or one
            client's partition).
        ways, shots, query: episode shape (``shots`` / ``query`` drawings per class).
        image_size: image side in pixels.
        drawings: drawings per character in the bank.
        rotations: add rotated background characters as classes.
        render_seed: seed of the drawings (rendered bank only).
        folder: cache folder of drawing banks (rendered bank only).
        style: draw training images from this face's bank only (``style`` partition).
        eager_eval: load the evaluation drawings now rather than on first use.
        bank: where the images come from (default: the rendered, cached glyph drawings).
    """

    name = "glyphs"
    models = ("conv4",)
    kind = "classification"
    #: a client's family differs from the whole family's (:meth:`for_client`)
    per_client: ClassVar[bool] = True

    @classmethod
    def from_config(cls, cfg: Config, *, site: str | Path | None = None) -> TaskFamily:
        """The whole benchmark (:meth:`build` without a client; ``site`` is not used)."""
        return cls.build(cfg)

    @classmethod
    def for_client(cls, cfg: Config, client_id: int) -> TaskFamily:
        """Client ``client_id``'s share of the benchmark (:meth:`build`)."""
        return cls.build(cfg, client_id)

    @classmethod
    def build(cls, cfg: Config, client_id: int | None = None) -> TaskFamily:
        """The family of a config, whole or one client's share (here :func:`build_glyph_family`).

        A family over another catalog (Omniglot) overrides this one method.
        """
        return build_glyph_family(cfg, client_id)

    @classmethod
    def from_catalog(
        cls,
        cfg: Config,
        catalog: ClassCatalog,
        client_id: int | None,
        *,
        drawings: int,
        bank: BankLoader | None = None,
    ) -> Self:
        """The family of ``cfg`` over ``catalog``: whole (``client_id=None``) or one client's share.

        The episode shape is ``cfg.task``'s (ways, shots, query, image size, rotations), and so are
        the rendered bank's seed and cache folder (used when no ``bank`` is given); the characters
        (and the face, for the ``style`` partition) are the client's
        :func:`~fedmeta.tasks.glyphs.partition.client_classes`. A whole family loads its evaluation
        drawings now, a client's on first use.

        Args:
            cfg: the run configuration.
            catalog: the character table.
            client_id: the federated client, or ``None`` for every background character.
            drawings: drawings per character in the bank.
            bank: where the images come from (default: the rendered, cached glyph drawings).

        Raises:
            ConfigError: if the partition or a split is too small for ``task.ways``.
        """
        t = cfg.task
        characters, style = client_classes(cfg, catalog, client_id)
        return cls(
            catalog,
            characters,
            ways=t.ways,
            shots=t.shots,
            query=t.query,
            image_size=t.image_size,
            drawings=drawings,
            rotations=t.rotations,
            render_seed=t.render_seed,
            folder=cache_dir(t.cache_dir),
            style=style,
            eager_eval=client_id is None,
            bank=bank,
        )

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The glyph keys of ``task`` in range; when selected, ``shots + query`` drawings per character exist."""
        t = cfg.task
        require(16 <= t.image_size <= 128, "task.image_size", t.image_size, "must be between 16 and 128 pixels")
        require(t.drawings >= 2, "task.drawings", t.drawings, "must be at least 2")
        require(t.partition in PARTITIONS, "task.partition", t.partition, f"must be one of {', '.join(PARTITIONS)}")
        require(
            t.dirichlet_alpha > 0 and math.isfinite(t.dirichlet_alpha),
            "task.dirichlet_alpha",
            t.dirichlet_alpha,
            "must be a positive number",
        )
        require(t.render_seed >= 0, "task.render_seed", t.render_seed, "must be a non-negative integer")
        require(
            t.cache_dir is None or bool(t.cache_dir.strip()),
            "task.cache_dir",
            t.cache_dir,
            "must be null or a folder path",
        )
        if t.name == cls.name:
            require(
                t.shots + t.query <= t.drawings,
                "task.query",
                t.query,
                f"plus task.shots ({t.shots}) must not exceed task.drawings ({t.drawings}), the drawings per character",
            )

    def __init__(
        self,
        catalog: ClassCatalog,
        train_characters: np.ndarray,
        *,
        ways: int,
        shots: int,
        query: int,
        image_size: int,
        drawings: int,
        rotations: bool,
        render_seed: int = 0,
        folder: Path | None = None,
        style: int | None = None,
        eager_eval: bool = True,
        bank: BankLoader | None = None,
    ) -> None:
        if shots + query > drawings:
            raise ConfigError(f"task.shots + task.query ({shots} + {query}) exceed task.drawings ({drawings})")
        self.catalog = catalog
        self.ways, self.shots, self.query = ways, shots, query
        self.image_size, self.drawings = image_size, drawings
        self.rotations, self.render_seed, self.folder, self.style = rotations, render_seed, folder, style
        self._loader = bank
        self.input_shape = (1, image_size, image_size)
        self.output_dim = ways
        self.train_characters = np.sort(np.asarray(train_characters, dtype=np.int64))
        self.eval_characters = catalog.split_classes("eval")
        if np.intersect1d(self.train_characters, self.eval_characters).size:
            raise ValueError("training characters overlap the evaluation alphabets")
        turns = [catalog.rotations_of(c) if rotations else [0] for c in self.train_characters.tolist()]
        self._classes = {
            "train": torch.tensor(
                [ROTATIONS * c + k for c, ks in zip(self.train_characters.tolist(), turns) for k in ks]
            ),
            "eval": torch.from_numpy(ROTATIONS * self.eval_characters),
        }
        for split, ids in self._classes.items():
            if ids.numel() < ways:
                raise ConfigError(
                    f"config key 'task.ways' is {ways} but the '{split}' split has only {ids.numel()} classes"
                )
        self._pools: dict[str, _Pool] = {}
        self._load(("train", "eval") if eager_eval else ("train",))

    # -- drawings ----------------------------------------------------------------------------

    def _bank(self, characters: np.ndarray, style: int | None) -> np.ndarray:
        if self._loader is not None:
            return self._loader(characters, style)
        if not isinstance(self.catalog, GlyphCatalog) or self.folder is None:
            raise ValueError("a catalog other than the glyph list needs its own image bank")
        return load_bank(
            self.catalog,
            characters,
            style=style,
            image_size=self.image_size,
            drawings=self.drawings,
            render_seed=self.render_seed,
            folder=self.folder,
        )

    def _load(self, splits: tuple[str, ...]) -> None:
        n = len(self.catalog)
        everything = np.arange(n)
        mixed = None
        for split in splits:
            if split in self._pools:
                continue
            if split == "train" and self.style is not None:
                # one bank per face, over every background character of that face (shared by
                # all clients of the face)
                background = self.catalog.split_classes("train")
                face = background[(self.catalog.style_mask[background] >> self.style) & 1 == 1]
                pool = _Pool.of(self._bank(face, self.style), face, n)
            else:
                mixed = self._bank(everything, None) if mixed is None else mixed
                pool = _Pool.of(mixed, everything, n)
            chars = self.train_characters if split == "train" else self.eval_characters
            if np.any(pool.row[chars] < 0):
                raise ValueError(f"drawing bank lacks characters of the '{split}' split")
            self._pools[split] = pool

    def classes(self, split: str) -> Tensor:
        """Global class ids of a split (``ROTATIONS * character + quarter_turns``)."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self._classes[split]

    # -- TaskFamily --------------------------------------------------------------------------

    def sample_params(self, gen: torch.Generator, n: int, split: str) -> Tensor:
        """``[n, ways]`` class ids: ``ways`` distinct classes of ``split`` per episode, in label order."""
        ids = self.classes(split)
        picks = (
            torch.multinomial(torch.ones(n, ids.numel()), self.ways, replacement=False, generator=gen)
            if n
            else torch.zeros(0, self.ways, dtype=torch.int64)
        )
        return ids[picks]

    def make_tasks(self, params: Tensor, gen: torch.Generator) -> TaskBatch:
        """Episodes for class ids ``params`` (``[T, ways]``); drawings picked with ``gen``."""
        params = params.to(torch.int64)
        if params.dim() != 2 or params.shape[1] != self.ways:
            raise ValueError(f"glyph task parameters must be [n, {self.ways}] class ids, got {tuple(params.shape)}")
        t = params.shape[0]
        per_class = self.shots + self.query
        characters = (params // ROTATIONS).numpy()
        turns = params % ROTATIONS
        picks = torch.rand(t, self.ways, self.drawings, generator=gen).argsort(dim=-1)[..., :per_class].numpy()
        size = self.image_size
        images = np.zeros((t, self.ways, per_class, size, size), dtype=np.uint8)
        placed = np.zeros((t, self.ways), dtype=bool)
        for split in SPLITS:
            pool = self._pools.get(split)
            where = self._pool_mask(split, characters)
            if not where.any():
                continue
            if pool is None:
                self._load((split,))
                pool = self._pools[split]
            rows = pool.row[characters[where]]
            images[where] = pool.images[rows[:, None], picks[where]]
            placed |= where
        if not placed.all():
            bad = sorted(set(params[torch.from_numpy(~placed)].tolist()))[:5]
            raise ValueError(f"glyph class ids {bad} are not classes of this family")
        x = torch.from_numpy(images)
        for k in range(1, ROTATIONS):
            sel = turns == k
            if sel.any():
                x[sel] = torch.rot90(x[sel], k, dims=(-2, -1))
        x = (x.to(torch.float32) / 255.0).unsqueeze(3)  # [T, ways, per_class, 1, H, W]
        s, q = self.shots, self.query
        labels = torch.arange(self.ways)
        return TaskBatch(
            support_x=x[:, :, :s].reshape(t, self.ways * s, 1, size, size),
            support_y=labels.repeat_interleave(s).expand(t, -1).contiguous(),
            query_x=x[:, :, s:].reshape(t, self.ways * q, 1, size, size),
            query_y=labels.repeat_interleave(q).expand(t, -1).contiguous(),
            kind=self.kind,
            params=params,
            ids=tuple(self.describe_classes(row) for row in params.tolist()),
        )

    def _pool_mask(self, split: str, characters: np.ndarray) -> np.ndarray:
        own = self.train_characters if split == "train" else self.eval_characters
        return np.isin(characters, own)

    def describe_classes(self, ids: list[int]) -> str:
        """``'U+0531 U+10D0@90 ...'``: the characters of an episode, with their rotation."""
        parts = []
        for cid in ids:
            turn = cid % ROTATIONS
            parts.append(self.catalog.class_name(cid // ROTATIONS) + (f"@{90 * turn}" if turn else ""))
        return " ".join(parts)


def build_glyph_family(cfg: Config, client_id: int | None = None) -> TaskFamily:
    """The glyphs family of a config: the whole benchmark, or one federated client's share.

    With ``client_id=None``, ``"train"`` episodes come from every background alphabet and
    ``"eval"`` episodes from the evaluation alphabets. With a client id, ``"train"`` episodes
    come from that client's partition (``task.partition``, :mod:`.partition`); its ``"eval"``
    split is still the evaluation alphabets, loaded only if asked for.

    Raises:
        ConfigError: if the partition or the splits are too small for ``task.ways``.
        DataFormatError: if the stored glyph list is unreadable.
    """
    return GlyphFamily.from_catalog(cfg, load_catalog(), client_id, drawings=cfg.task.drawings)


def make_glyph_sites(
    cfg: Config, sites: int, out: str | Path, *, tasks_per_site: int | None, heldout_per_site: int
) -> list[Path]:
    """Write ``sites`` site folders of glyph tasks in the on-disk format of :mod:`fedmeta.tasks.folder`.

    Site ``c`` is federated client ``c`` (``federation.clients_total`` must be at least
    ``sites``): each of its ``tasks_per_site`` training tasks (default ``task.tasks_per_site``
    or 20) is a ``ways``-way problem over its own partition of the background classes, stored
    as *all* drawings of those classes (``x [N, 1, H, W]`` float32, ``y [N]`` labels
    ``0..ways-1``), so every round can draw a fresh support/query split; its held-out tasks are
    ``ways``-way problems over the evaluation alphabets.

    Raises:
        ConfigError: if ``sites`` exceeds ``federation.clients_total``.
    """
    if sites > cfg.federation.clients_total:
        raise ConfigError(
            f"--sites {sites} exceeds federation.clients_total ({cfg.federation.clients_total}); "
            "each site is one federated client's partition"
        )
    n_tasks = tasks_per_site or cfg.task.tasks_per_site or 20
    # a task file holds every drawing of its classes: shots + query = drawings
    wide = replace(cfg, task=replace(cfg.task, shots=cfg.task.drawings - 1, query=1))
    whole: GlyphFamily | None = None
    root = Path(out)
    written = []

    def draw(fam: GlyphFamily, c: int, split: str, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        gen = make_generator(cfg.seed, "make-data", split, c)
        batch = fam.sample(gen, count, split)
        x = torch.cat([batch.support_x, batch.query_x], dim=1).numpy()
        y = torch.cat([batch.support_y, batch.query_y], dim=1).numpy()
        return [(f"{split}-{i:04d}", x[i], y[i]) for i in range(count)]

    for c in range(sites):
        family = build_glyph_family(wide, client_id=c)
        assert isinstance(family, GlyphFamily)
        heldout = None
        if heldout_per_site > 0:
            if whole is None:
                built = build_glyph_family(wide)
                assert isinstance(built, GlyphFamily)
                whole = built
            heldout = draw(whole, c, "eval", heldout_per_site)
        site = write_site(
            root / f"site-{c:04d}",
            draw(family, c, "train", n_tasks),
            heldout=heldout,
            kind="classification",
            name=f"glyphs client {c}",
        )
        written.append(site)
    log.info("wrote %d glyph site folders under %s", sites, root)
    return written
