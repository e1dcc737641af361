"""Build ``fedmeta/data/glyphs.json``: the deduplicated character list of the glyphs benchmark.

Run once by a maintainer (``python -m simulations.build_glyph_list``); the result is committed,
never recomputed at run time, because bitmaps (and so the duplicate decisions) vary with the
FreeType version. What it does:

1. Every code point with a non-empty outline in any of the twelve DejaVu faces of matplotlib's
   wheel (``fontTools`` ``getBestCmap()``; glyphs with no contours skipped), restricted to
   letters, numbers, symbols and punctuation without a Unicode decomposition (accented and
   styled variants are dropped: they differ from their base letter by a mark or not at all).
2. Each character is rendered exactly as the benchmark renders it (its natural place in the em
   box, :mod:`fedmeta.tasks.glyphs.render`) in every face that has it; a face is kept only if
   the ink fits the canvas and covers at least ``MIN_INK`` pixels at 28x28.
3. Duplicates are removed greedily, in priority order (letters of evaluation scripts, then
   letters of background scripts, then everything else), on the binarised 28x28 bitmap of the
   character's first face: exact or near-exact (IoU >= 0.9) matches, then the same on bitmaps
   cropped to the ink and scaled to a common size, which merges case pairs such as o/O, s/S.
   Braille cells are never compared with each other (they differ by single dots by design).
4. For the 90-degree rotation augmentation, a rotation of a background character is allowed
   only if it does not collide (by the same two tests) with any kept character or with a kept
   rotation of another one — so ``6`` turned upside down never becomes a second ``9``, and a
   point-symmetric ``Z`` gets no 180-degree class.
5. Alphabets are Unicode scripts; characters of the Common script take their Unicode block as
   alphabet, and blocks with fewer than ``MIN_BLOCK`` characters are pooled into "Other symbols".
   The evaluation alphabets (:data:`EVALUATION_ALPHABETS`) are whole scripts, as Omniglot's
   evaluation set is whole alphabets.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import sys
import time
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fedmeta.tasks.glyphs.render import STYLES, downsample, font_path, freetype_version, render_masters

__all__ = ["build", "main", "EVALUATION_ALPHABETS"]

log = logging.getLogger(__name__)

OUT = Path(__file__).resolve().parents[1] / "fedmeta" / "data" / "glyphs.json"

#: Scripts held out for evaluation (about 400 characters, like Omniglot's 659 in 20 alphabets).
EVALUATION_ALPHABETS = ("Armenian", "Georgian", "Tifinagh", "Nko", "Hebrew", "Lao", "Ogham", "Old Italic")
IMAGE_SIZE = 28
MIN_INK = 12
IOU = 0.9
NORMALISED = 24
MIN_BLOCK = 20
KEEP_CATEGORIES = ("L", "N", "S", "P")
_COMMON = ("Zyyy", "Zinh", "Zzzz")


def _candidates() -> dict[int, int]:
    """Code point -> style mask of the faces that have a non-empty outline for it."""
    from fontTools.ttLib import TTFont

    masks: dict[int, int] = {}
    for index in range(len(STYLES)):
        font = TTFont(str(font_path(index)))
        glyf = font["glyf"]
        for cp, name in font.getBestCmap().items():
            glyph = glyf[name]
            if glyph.numberOfContours == 0:
                continue
            masks[cp] = masks.get(cp, 0) | (1 << index)
        font.close()
    return masks


def _alphabet_of(cp: int) -> tuple[str, bool]:
    """(alphabet name, is a script rather than a symbol block)."""
    from fontTools import unicodedata as fu

    script = fu.script(chr(cp))
    if script in _COMMON:
        return str(fu.block(chr(cp))), False
    return str(fu.script_name(script)), True


def _binary(images: torch.Tensor) -> torch.Tensor:
    return (images >= 128).reshape(images.shape[0], -1).float()


def _normalised(masters: torch.Tensor) -> torch.Tensor:
    """Crop each master to its ink, pad to a centred square, scale to NORMALISED px, binarise."""
    out = torch.zeros(masters.shape[0], NORMALISED * NORMALISED)
    for i, m in enumerate(masters):
        ink = torch.nonzero(m >= 128)
        if ink.numel() == 0:
            continue
        (r0, c0), (r1, c1) = ink.min(0).values.tolist(), ink.max(0).values.tolist()
        crop = m[r0 : r1 + 1, c0 : c1 + 1].float() / 255.0
        h, w = crop.shape
        side = max(h, w)
        square = torch.zeros(side, side)
        square[(side - h) // 2 : (side - h) // 2 + h, (side - w) // 2 : (side - w) // 2 + w] = crop
        small = F.adaptive_avg_pool2d(square[None, None], NORMALISED) if side >= NORMALISED else F.interpolate(
            square[None, None], size=NORMALISED, mode="bilinear", align_corners=False
        )
        out[i] = (small.flatten() >= 0.5).float()
    return out


def _collisions(a: torch.Tensor, b: torch.Tensor, block: int = 2048) -> list[tuple[int, int]]:
    """Index pairs (i, j) with IoU(a_i, b_j) >= IOU, for binary row matrices."""
    pairs: list[tuple[int, int]] = []
    sb = b.sum(1)
    for start in range(0, a.shape[0], block):
        chunk = a[start : start + block]
        inter = chunk @ b.T
        union = chunk.sum(1, keepdim=True) + sb[None, :] - inter
        hit = torch.nonzero(inter >= IOU * union.clamp_min(1.0))
        pairs.extend((start + int(i), int(j)) for i, j in hit.tolist())
    return pairs


def _greedy(order: list[int], conflicts: dict[int, set[int]], already: set[int]) -> set[int]:
    """Keep items in ``order`` unless they conflict with one kept earlier (or in ``already``)."""
    kept = set(already)
    for item in order:
        if not (conflicts.get(item, set()) & kept):
            kept.add(item)
    return kept - set(already)


def _conflict_graph(raw: torch.Tensor, norm: torch.Tensor, braille: np.ndarray) -> dict[int, set[int]]:
    graph: dict[int, set[int]] = {}
    for feats in (raw, norm):
        for i, j in _collisions(feats, feats):
            if i == j or (braille[i] and braille[j]):
                continue
            graph.setdefault(i, set()).add(j)
            graph.setdefault(j, set()).add(i)
    return graph


def build() -> dict[str, object]:
    """Compute the glyph table (see the module docstring). Returns the JSON document."""
    started = time.perf_counter()
    masks = _candidates()
    log.info("%d code points with outlines in the DejaVu faces", len(masks))
    cps = sorted(
        cp
        for cp in masks
        if unicodedata.category(chr(cp))[0] in KEEP_CATEGORIES and not unicodedata.decomposition(chr(cp))
    )
    log.info("%d letters, numbers, symbols and punctuation without a decomposition", len(cps))

    # render every (character, face) pair; keep faces whose ink fits and is big enough
    pairs = [(cp, s) for cp in cps for s in range(len(STYLES)) if masks[cp] >> s & 1]
    masters, fits = render_masters([p[0] for p in pairs], [p[1] for p in pairs], IMAGE_SIZE)
    small = downsample(torch.from_numpy(masters), IMAGE_SIZE)
    ink = (small >= 128).reshape(len(pairs), -1).sum(1).numpy()
    style_mask = dict.fromkeys(cps, 0)
    first: dict[int, int] = {}
    for k, (cp, s) in enumerate(pairs):
        if fits[k] and ink[k] >= MIN_INK:
            style_mask[cp] |= 1 << s
            first.setdefault(cp, k)
    cps = [cp for cp in cps if style_mask[cp]]
    log.info("%d characters render inside the canvas with >= %d ink pixels", len(cps), MIN_INK)

    canon_master = torch.from_numpy(masters[[first[cp] for cp in cps]])
    canon = small[[first[cp] for cp in cps]]
    alpha = [_alphabet_of(cp) for cp in cps]
    braille = np.array([name == "Braille" for name, _ in alpha])
    is_letter = [unicodedata.category(chr(cp))[0] == "L" and script for cp, (_, script) in zip(cps, alpha)]
    is_eval = [name in EVALUATION_ALPHABETS for name, _ in alpha]
    priority = sorted(
        range(len(cps)), key=lambda i: (0 if is_eval[i] and is_letter[i] else 1 if is_letter[i] else 2, cps[i])
    )

    # 1. characters: exact / near duplicates on raw and on size-normalised bitmaps
    raw, norm = _binary(canon), _normalised(canon_master)
    graph = _conflict_graph(raw, norm, braille)
    kept = _greedy(priority, graph, set())
    order = [i for i in priority if i in kept]
    log.info("%d characters after removing duplicates", len(order))

    # 2. rotations: variant (i, k) = character i turned by k * 90 degrees counter-clockwise
    variants = [(i, k) for k in range(4) for i in order]
    var_raw = torch.cat([_binary(torch.rot90(canon[order], k, dims=(1, 2))) for k in range(4)])
    var_norm = torch.cat([_normalised(torch.rot90(canon_master[order], k, dims=(1, 2))) for k in range(4)])
    var_braille = np.concatenate([braille[order]] * 4)
    var_graph = _conflict_graph(var_raw, var_norm, var_braille)
    n = len(order)
    unrotated = set(range(n))
    # identical rotations of one character collide with themselves too: drop them
    rotated_order = [v for v in range(n, 4 * n) if not is_eval[variants[v][0]]]
    kept_rot = _greedy(rotated_order, var_graph, unrotated)
    rot_mask = dict.fromkeys(order, 1)
    for v in kept_rot:
        i, k = variants[v]
        rot_mask[i] |= 1 << k

    # 3. alphabets
    counts = Counter(alpha[i][0] for i in order)
    def alphabet(i: int) -> str:
        name, script = alpha[i]
        return name if script or counts[name] >= MIN_BLOCK else "Other symbols"

    rows = sorted(order, key=lambda i: (alphabet(i), cps[i]))
    names = sorted({alphabet(i) for i in rows})
    missing = sorted(set(EVALUATION_ALPHABETS) - set(names))
    if missing:
        raise RuntimeError(f"evaluation alphabets {missing} have no characters left")
    table = [[cps[i], chr(cps[i]), alphabet(i), style_mask[cps[i]], rot_mask[i]] for i in rows]
    per_alphabet = Counter(r[2] for r in table)
    digest = hashlib.sha256(json.dumps(table, ensure_ascii=True).encode()).hexdigest()
    import fontTools
    import matplotlib

    doc: dict[str, object] = {
        "description": "Deduplicated characters of the glyphs few-shot benchmark (fedmeta). "
        "Written by simulations/build_glyph_list.py; do not edit by hand.",
        "format": 1,
        "built_with": {
            "matplotlib": matplotlib.__version__,
            "freetype": freetype_version(),
            "fonttools": fontTools.version,
            "python_unicodedata": unicodedata.unidata_version,
        },
        "parameters": {
            "image_size": IMAGE_SIZE,
            "min_ink_pixels": MIN_INK,
            "iou_threshold": IOU,
            "normalised_size": NORMALISED,
            "min_block_size": MIN_BLOCK,
            "categories": list(KEEP_CATEGORIES),
        },
        "styles": [{"name": s.name, "file": s.file} for s in STYLES],
        "alphabets": [
            {
                "name": a,
                "split": "evaluation" if a in EVALUATION_ALPHABETS else "background",
                "characters": per_alphabet[a],
            }
            for a in names
        ],
        "columns": ["codepoint", "char", "alphabet", "style_mask", "rotation_mask"],
        "glyphs_sha256": digest,
        "glyphs": table,
    }
    log.info(
        "%d characters in %d alphabets (%d evaluation characters); %.1f s",
        len(table),
        len(names),
        sum(per_alphabet[a] for a in EVALUATION_ALPHABETS),
        time.perf_counter() - started,
    )
    return doc


def write(doc: dict[str, object], path: Path) -> None:
    """Write the document with one glyph per line (diff-friendly)."""
    head = {k: v for k, v in doc.items() if k != "glyphs"}
    text = json.dumps(head, indent=1, ensure_ascii=False)[:-2]
    rows = ",\n  ".join(json.dumps(r, ensure_ascii=False) for r in doc["glyphs"])  # type: ignore[union-attr]
    path.write_text(f'{text},\n "glyphs": [\n  {rows}\n ]\n}}\n', encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: build and write the glyph list."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=OUT, help=f"output file (default {OUT})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    torch.set_num_threads(1)
    doc = build()
    write(doc, args.out)
    json.loads(args.out.read_text(encoding="utf-8"))  # round-trip check
    log.info("wrote %s", args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
