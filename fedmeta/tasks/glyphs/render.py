"""Rendering glyphs from the DejaVu fonts in matplotlib's wheel, and "drawing" them.

A *master* is one character in one font style, rasterised by FreeType (through matplotlib's
``ft2font``) at three times the output resolution, at its natural place in the font's em box:
the baseline sits at a fixed height and only the horizontal position is centred on the ink.
Keeping the vertical position and the size (no crop-to-ink-and-rescale) is what keeps ``.``,
``·``, ``▪`` and ``█`` apart, and lower from upper case.

A *drawing* is a master warped by a random affine map (rotation ±15°, shear ±0.25, scale
0.8–1.1, shift ±8 % of the image), area-averaged down to the output size, and thickened by a
grey max-filter (stroke width +0–2 output pixels). Everything here is a pure function of its inputs and the
``torch.Generator`` passed in; bilinear sampling and pooling on the CPU are deterministic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "STYLES",
    "FontStyle",
    "SUPERSAMPLE",
    "font_dir",
    "font_path",
    "freetype_version",
    "master_size",
    "render_masters",
    "sample_distortions",
    "distort",
    "downsample",
    "DISTORTION_RANGES",
]

#: Masters are rendered at ``SUPERSAMPLE`` times the output size and area-averaged down.
SUPERSAMPLE = 3

#: Em size as a fraction of the master canvas, and the DejaVu Sans ascender/descender (in em)
#: that fix the baseline for every style, so that all styles share one vertical layout.
_EM_FRACTION = 1.0 / 1.3
_ASCENDER = 0.928
_DESCENDER = -0.236


@dataclass(frozen=True)
class FontStyle:
    """One of the twelve DejaVu faces: a short name and its file in matplotlib's font folder."""

    name: str
    file: str


#: The twelve DejaVu faces shipped in matplotlib's wheel, in a fixed order (the index of a
#: style is what ``fedmeta/data/glyphs.json`` stores in its style masks). The "Display" faces
#: (a handful of glyphs) and ``LastResortHE`` (placeholder icons) are deliberately absent.
STYLES: tuple[FontStyle, ...] = (
    FontStyle("sans", "DejaVuSans.ttf"),
    FontStyle("sans-bold", "DejaVuSans-Bold.ttf"),
    FontStyle("sans-oblique", "DejaVuSans-Oblique.ttf"),
    FontStyle("sans-bold-oblique", "DejaVuSans-BoldOblique.ttf"),
    FontStyle("serif", "DejaVuSerif.ttf"),
    FontStyle("serif-bold", "DejaVuSerif-Bold.ttf"),
    FontStyle("serif-italic", "DejaVuSerif-Italic.ttf"),
    FontStyle("serif-bold-italic", "DejaVuSerif-BoldItalic.ttf"),
    FontStyle("mono", "DejaVuSansMono.ttf"),
    FontStyle("mono-bold", "DejaVuSansMono-Bold.ttf"),
    FontStyle("mono-oblique", "DejaVuSansMono-Oblique.ttf"),
    FontStyle("mono-bold-oblique", "DejaVuSansMono-BoldOblique.ttf"),
)

#: Ranges of the random "drawing" distortions (see :func:`sample_distortions`).
DISTORTION_RANGES: dict[str, tuple[float, float]] = {
    "rotation_deg": (-15.0, 15.0),
    "shear": (-0.25, 0.25),
    "scale": (0.8, 1.1),
    "shift": (-0.08, 0.08),
    "thicken_px": (0.0, 2.0),
}


def font_dir() -> Path:
    """The folder holding matplotlib's bundled TrueType fonts."""
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf"


def font_path(style: int) -> Path:
    """Path of the font file of style index ``style``."""
    return font_dir() / STYLES[style].file


def freetype_version() -> str:
    """The FreeType version matplotlib was built with (bitmaps depend on it)."""
    from matplotlib import ft2font

    return str(ft2font.__freetype_version__)


def master_size(image_size: int) -> int:
    """Side of the master canvas for a given output size."""
    return SUPERSAMPLE * image_size


def _place(glyph: object, canvas: int) -> tuple[int, int, int, int]:
    """Top-left corner and size of a loaded glyph's bitmap on the canvas (natural vertical place)."""
    em = canvas * _EM_FRACTION
    baseline = canvas / 2.0 + em * (_ASCENDER + _DESCENDER) / 2.0
    width = int(math.ceil(glyph.width / 64.0))  # type: ignore[attr-defined]
    height = int(math.ceil(glyph.height / 64.0))  # type: ignore[attr-defined]
    left = int(round((canvas - width) / 2.0))
    top = int(round(baseline - glyph.horiBearingY / 64.0))  # type: ignore[attr-defined]
    return left, top, width, height


def render_masters(codepoints: list[int], styles: list[int], image_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Rasterise characters at their natural place in the em box, at master resolution.

    Args:
        codepoints: Unicode code points.
        styles: the style index (into :data:`STYLES`) of each code point.
        image_size: output size; masters are ``SUPERSAMPLE * image_size`` pixels square.

    Returns:
        ``(masters, fits)``: ``uint8 [N, M, M]`` grey images (ink 255) and a boolean ``[N]`` that is
        False where the font lacks the character or its ink does not fit inside the canvas (such
        a master is left blank).
    """
    from matplotlib import ft2font

    if len(codepoints) != len(styles):
        raise ValueError(f"{len(codepoints)} code points but {len(styles)} styles")
    canvas = master_size(image_size)
    out = np.zeros((len(codepoints), canvas, canvas), dtype=np.uint8)
    fits = np.zeros(len(codepoints), dtype=bool)
    order = np.argsort(np.asarray(styles, dtype=np.int64), kind="stable")
    font = None
    current = -1
    for i in order.tolist():
        style = int(styles[i])
        if style != current:
            font = ft2font.FT2Font(str(font_path(style)))
            font.set_size(canvas * _EM_FRACTION, 72)
            current = style
        assert font is not None
        if font.get_char_index(int(codepoints[i])) == 0:
            continue
        glyph = font.load_char(int(codepoints[i]), ft2font.LoadFlags.NO_HINTING)
        left, top, width, height = _place(glyph, canvas)
        if width == 0 or height == 0:
            continue
        if left < 0 or top < 0 or left + width > canvas or top + height > canvas:
            continue
        font.draw_glyph_to_bitmap(out[i], left, top, glyph)
        fits[i] = True
    return out, fits


def sample_distortions(gen: torch.Generator, n: int) -> Tensor:
    """Draw ``n`` distortions ``[n, 6]``: rotation (deg), shear, scale, shift x, shift y, thickening (px).

    Uniform within :data:`DISTORTION_RANGES`; shifts are fractions of the image side.
    """
    r = DISTORTION_RANGES
    cols = [r["rotation_deg"], r["shear"], r["scale"], r["shift"], r["shift"], r["thicken_px"]]
    lo = torch.tensor([c[0] for c in cols])
    hi = torch.tensor([c[1] for c in cols])
    return lo + (hi - lo) * torch.rand(n, len(cols), generator=gen)


def _thicken(images: Tensor, pixels: Tensor) -> Tensor:
    """Thicken strokes by ``pixels`` (0-2) output pixels.

    A 3x3 grey dilation grows every stroke by two pixels; blending it with the image by
    ``pixels / 2`` gives a continuous thickening of antialiased strokes at a fraction of the
    cost of dilating at master resolution.
    """
    grown = F.max_pool2d(images, kernel_size=3, stride=1, padding=1)
    weight = (pixels / 2.0).clamp(0.0, 1.0).view(-1, 1, 1, 1)
    return images + weight * (grown - images)


def _sampling_grid(inverse: Tensor, offset: Tensor, side: int) -> Tensor:
    """``F.affine_grid`` for ``align_corners=False``, computed by broadcasting (several times faster)."""
    coords = (torch.arange(side, dtype=torch.float32) * 2.0 + 1.0) / side - 1.0
    gx = coords.view(1, 1, side)
    gy = coords.view(1, side, 1)
    a = inverse.unsqueeze(-1).unsqueeze(-1)
    b = offset.view(-1, 2, 1, 1)
    x_in = a[:, 0, 0] * gx + a[:, 0, 1] * gy + b[:, 0]
    y_in = a[:, 1, 0] * gx + a[:, 1, 1] * gy + b[:, 1]
    return torch.stack([x_in, y_in], dim=-1)


#: Images warped per call of the sampler: small chunks keep the temporaries in the CPU cache
#: (about twice the throughput of one large batch).
_CHUNK = 64


def distort(masters: Tensor, params: Tensor, image_size: int) -> Tensor:
    """Turn masters into drawings.

    Args:
        masters: ``uint8`` ``[N, M, M]`` masters (ink 255).
        params: ``[N, 6]`` from :func:`sample_distortions`.
        image_size: output side ``S`` (``M == SUPERSAMPLE * S``).

    Returns:
        ``uint8 [N, S, S]`` drawings.
    """
    if masters.shape[0] != params.shape[0]:
        raise ValueError(f"{masters.shape[0]} masters but {params.shape[0]} distortions")
    if masters.shape[0] <= _CHUNK:
        return _distort(masters, params, image_size)
    parts = [
        _distort(masters[i : i + _CHUNK], params[i : i + _CHUNK], image_size)
        for i in range(0, masters.shape[0], _CHUNK)
    ]
    return torch.cat(parts)


def _distort(masters: Tensor, params: Tensor, image_size: int) -> Tensor:
    n, canvas = masters.shape[0], masters.shape[-1]
    if canvas != master_size(image_size):
        raise ValueError(f"masters are {canvas}px but image_size {image_size} needs {master_size(image_size)}px")
    if n == 0:
        return torch.zeros(0, image_size, image_size, dtype=torch.uint8)
    x = masters.reshape(n, 1, canvas, canvas).float() / 255.0
    theta = torch.deg2rad(params[:, 0])
    shear, scale = params[:, 1], params[:, 2]
    shift = 2.0 * params[:, 3:5]  # fraction of the side -> normalized [-1, 1] coordinates
    cos, sin = torch.cos(theta), torch.sin(theta)
    rot = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    sh = torch.zeros(n, 2, 2)
    sh[:, 0, 0] = 1.0
    sh[:, 1, 1] = 1.0
    sh[:, 0, 1] = shear
    forward = scale.view(n, 1, 1) * (rot @ sh)  # content: p_out = forward @ p_in + shift
    inverse = torch.linalg.inv(forward)
    offset = -(inverse @ shift.unsqueeze(-1))
    grid = _sampling_grid(inverse, offset, canvas)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    small = _thicken(F.avg_pool2d(warped, SUPERSAMPLE), params[:, 5])
    return _to_uint8(small.reshape(n, image_size, image_size))


def downsample(masters: Tensor, image_size: int) -> Tensor:
    """Undistorted masters area-averaged to ``uint8 [N, S, S]`` (the canonical bitmaps)."""
    n, canvas = masters.shape[0], masters.shape[-1]
    x = masters.reshape(n, 1, canvas, canvas).float() / 255.0
    return _to_uint8(F.avg_pool2d(x, canvas // image_size).reshape(n, image_size, image_size))


def _to_uint8(x: Tensor) -> Tensor:
    return torch.round(x.clamp(0.0, 1.0) * 255.0).to(torch.uint8)
