"""Glyphs: an offline Omniglot-like few-shot image benchmark rendered from the DejaVu fonts.

Characters of many scripts (the stored list in ``fedmeta/data/glyphs.json``) are classes;
scripts are alphabets, split into background (meta-training) and evaluation alphabets as in
Omniglot (Lake et al., 2015); "drawings" are random affine distortions, stroke thickenings and
font faces of each character, rendered once into an on-disk cache. See ``docs/glyphs.md``.

Modules: :mod:`.catalog` (the stored list), :mod:`.render` (FreeType masters and distortions),
:mod:`.cache` (the drawing bank on disk), :mod:`.partition` (federated non-IID clients),
:mod:`.family` (episodes).
"""

from fedmeta.tasks.glyphs.cache import CACHE_ENV, cache_dir, load_bank, render_bank
from fedmeta.tasks.glyphs.catalog import GlyphCatalog, load_catalog
from fedmeta.tasks.glyphs.family import ROTATIONS, GlyphFamily, build_glyph_family, make_glyph_sites
from fedmeta.tasks.glyphs.partition import PARTITIONS, client_partition
from fedmeta.tasks.glyphs.render import STYLES

__all__ = [
    "build_glyph_family",
    "make_glyph_sites",
    "GlyphFamily",
    "GlyphCatalog",
    "load_catalog",
    "client_partition",
    "cache_dir",
    "load_bank",
    "render_bank",
    "CACHE_ENV",
    "PARTITIONS",
    "ROTATIONS",
    "STYLES",
]
