"""The drawing bank: a fixed set of drawings per character, rendered once and cached on disk.

Like Omniglot's 20 drawings per character, every class has ``task.drawings`` fixed drawings.
The drawings of a character are a pure function of ``(task.render_seed, variant, code point,
task.drawings)`` — never of which other characters are rendered with them — so a bank of a few
characters holds exactly the rows of the full bank. A *variant* is ``"mixed"`` (each drawing in a random face the
character exists in) or one face name (every drawing in that face: the per-style banks that
the ``style`` federated partition uses).

Banks are cached as one file per (glyph list, variant, classes, size, drawings, seed,
FreeType/matplotlib/torch versions) under the cache folder (:func:`cache_dir`): a magic line,
a JSON header (the key, the shape, a CRC32 of the pixels) and the raw ``uint8`` pixels, which
are memory-mapped, so many task families in one process (one per simulated client) share one
copy in the page cache. A file is written atomically (temporary file, then rename); on loading,
its magic, key, size and checksum are verified, and anything that fails — unreadable,
truncated, tampered, from another version — is logged and rebuilt, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from fedmeta.rng import make_generator
from fedmeta.tasks.glyphs.catalog import GlyphCatalog
from fedmeta.tasks.glyphs.render import STYLES, distort, freetype_version, render_masters, sample_distortions

__all__ = [
    "cache_dir",
    "bank_key",
    "bank_path",
    "render_bank",
    "load_bank",
    "cached_bank",
    "write_atomic",
    "CACHE_ENV",
    "BANK_FORMAT",
]

log = logging.getLogger(__name__)

#: Environment variable naming the cache folder (``task.cache_dir`` takes precedence).
CACHE_ENV = "FEDMETA_CACHE_DIR"
#: Bumped whenever the rendering changes, so that old cache files are never reused.
BANK_FORMAT = 1


def cache_dir(configured: str | None = None) -> Path:
    """The folder for cached drawing banks.

    Precedence: ``configured`` (``task.cache_dir``), then ``$FEDMETA_CACHE_DIR``, then
    ``$XDG_CACHE_HOME/fedmeta``, then ``~/.cache/fedmeta`` — outside the repository by default.
    Banks go into its ``glyphs/`` subfolder.
    """
    if configured:
        base = Path(configured).expanduser()
    elif os.environ.get(CACHE_ENV):
        base = Path(os.environ[CACHE_ENV]).expanduser()
    elif os.environ.get("XDG_CACHE_HOME"):
        base = Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "fedmeta"
    else:
        base = Path.home() / ".cache" / "fedmeta"
    return base / "glyphs"


def _variant_name(style: int | None) -> str:
    return "mixed" if style is None else STYLES[style].name


def bank_key(
    catalog: GlyphCatalog, classes: np.ndarray, *, style: int | None, image_size: int, drawings: int, render_seed: int
) -> dict[str, object]:
    """Everything a bank's pixels depend on (stored in the file and compared on load)."""
    import matplotlib

    return {
        "format": BANK_FORMAT,
        "catalog": catalog.digest,
        "classes": hashlib.sha256(np.ascontiguousarray(classes, dtype=np.int64).tobytes()).hexdigest(),
        "num_classes": int(classes.shape[0]),
        "variant": _variant_name(style),
        "image_size": int(image_size),
        "drawings": int(drawings),
        "render_seed": int(render_seed),
        "freetype": freetype_version(),
        "matplotlib": matplotlib.__version__,
        "torch": torch.__version__.split("+")[0],
    }


def bank_path(folder: Path, key: dict[str, object]) -> Path:
    """File name of a bank: readable parameters plus a digest of the whole key."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return (
        folder / f"bank-{key['variant']}-{key['image_size']}px-{key['drawings']}x-seed{key['render_seed']}-{digest}.bin"
    )


def render_bank(
    catalog: GlyphCatalog, classes: np.ndarray, *, style: int | None, image_size: int, drawings: int, render_seed: int
) -> np.ndarray:
    """Render ``drawings`` drawings of each class.

    Args:
        catalog: the glyph list.
        classes: catalog indices of the classes to render.
        style: a face index for a single-style bank, ``None`` for mixed faces.
        image_size: output side in pixels.
        drawings: drawings per class.
        render_seed: seed of the drawings (``task.render_seed``).

    Returns:
        ``uint8 [len(classes), drawings, image_size, image_size]``, ink 255.

    Raises:
        ValueError: if a class is not rendered in the requested face.
    """
    variant = _variant_name(style)
    cps: list[int] = []
    faces: list[int] = []
    params = []
    for cls in classes.tolist():
        cp = int(catalog.codepoints[cls])
        gen = make_generator(render_seed, "glyph-drawing", variant, cp)
        available = catalog.styles_of(cls)
        if style is None:
            pick = torch.randint(len(available), (drawings,), generator=gen).tolist()
            faces.extend(available[p] for p in pick)
        else:
            if style not in available:
                raise ValueError(f"class {catalog.label(cls)} has no '{variant}' face")
            faces.extend([style] * drawings)
        cps.extend([cp] * drawings)
        params.append(sample_distortions(gen, drawings))
    if not cps:
        return np.zeros((0, drawings, image_size, image_size), dtype=np.uint8)
    # one master per distinct (character, face); drawings share it
    unique = sorted(set(zip(cps, faces)))
    where = {pair: i for i, pair in enumerate(unique)}
    masters, fits = render_masters([u[0] for u in unique], [u[1] for u in unique], image_size)
    if not fits.all():
        bad = [f"U+{unique[i][0]:04X}/{STYLES[unique[i][1]].name}" for i in np.flatnonzero(~fits)[:5]]
        raise ValueError(f"glyphs {bad} do not render inside the canvas with this FreeType; rebuild the glyph list")
    index = torch.tensor([where[pair] for pair in zip(cps, faces)])
    images = distort(torch.from_numpy(masters)[index], torch.cat(params), image_size)
    return images.numpy().reshape(len(classes), drawings, image_size, image_size)


_MAGIC = b"FEDMETA-GLYPH-BANK\n"


def _read(path: Path, key: dict[str, object]) -> np.ndarray:
    """Map and verify a bank file; raise ``ValueError`` (with the reason) if it cannot be trusted."""
    shape = (int(key["num_classes"]), int(key["drawings"]), int(key["image_size"]), int(key["image_size"]))  # type: ignore[call-overload]
    try:
        with path.open("rb") as fh:
            if fh.read(len(_MAGIC)) != _MAGIC:
                raise ValueError("not a glyph bank file (bad magic)")
            size = int.from_bytes(fh.read(8), "little")
            if not 0 < size < 1 << 20:
                raise ValueError(f"implausible header length {size}")
            header = json.loads(fh.read(size).decode("utf-8"))
        offset = len(_MAGIC) + 8 + size
        expected = offset + int(np.prod(shape))
        actual = path.stat().st_size
        if actual != expected:
            raise ValueError(f"{actual} bytes, expected {expected} (truncated or padded)")
        if not isinstance(header, dict) or header.get("key") != key:
            raise ValueError("written for different parameters")
        images = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=shape)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"unreadable ({type(exc).__name__}: {exc})") from exc
    if zlib.crc32(images.data) != header.get("crc32"):
        raise ValueError("checksum mismatch")
    return images


def write_atomic(path: Path, *chunks: bytes) -> None:
    """Write ``chunks`` to ``path`` atomically: a temporary file beside it, flushed to disk, then renamed.

    The file is made readable by all (``mkstemp`` makes it private; a cache may be shared by a team).

    Raises:
        OSError: if the folder cannot be created or written (no temporary file is left behind).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            for chunk in chunks:
                fh.write(chunk)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write(path: Path, key: dict[str, object], images: np.ndarray) -> None:
    data = np.ascontiguousarray(images, dtype=np.uint8)
    header = json.dumps({"key": key, "shape": list(data.shape), "crc32": zlib.crc32(data.data)}).encode("utf-8")
    write_atomic(path, _MAGIC, len(header).to_bytes(8, "little"), header, data.tobytes())


def cached_bank(
    path: Path,
    *,
    read: Callable[[Path], np.ndarray],
    make: Callable[[], np.ndarray],
    write: Callable[[Path, np.ndarray], None],
    what: str,
    remake: str,
    logger: logging.Logger,
) -> np.ndarray:
    """A drawing bank from its cache file if that verifies, else made and cached there.

    A file that cannot be trusted is reported in the log and replaced; a cache that cannot be
    written only costs the caching (the bank is still returned).

    Args:
        path: the cache file.
        read: reads and verifies the file; raises ``ValueError`` (with the reason) if it cannot be trusted.
        make: builds the bank (renders or decodes it).
        write: writes the bank to the file; may raise ``OSError``.
        what: the bank's name in the log (``"glyph"``, ``"Omniglot"``).
        remake: what happens instead of an untrusted file, in the log (``"rendering it again"``).
        logger: the log of the module the bank belongs to.

    Returns:
        The bank ``read`` or ``make`` returned.
    """
    if path.exists():
        try:
            images = read(path)
            logger.debug("%s bank loaded from %s", what, path)
            return images
        except ValueError as exc:
            logger.warning("%s cache file %s cannot be trusted (%s); %s", what, path, exc, remake)
    images = make()
    try:
        write(path, images)
        logger.info("%s bank cached at %s", what, path)
    except OSError as exc:
        logger.warning("cannot write the %s cache %s (%s); continuing without caching", what, path, exc)
    return images


def load_bank(
    catalog: GlyphCatalog,
    classes: np.ndarray,
    *,
    style: int | None,
    image_size: int,
    drawings: int,
    render_seed: int,
    folder: Path,
) -> np.ndarray:
    """The drawing bank for ``classes``: from the cache if it verifies, else rendered and cached.

    A cache file that cannot be read or fails verification is reported in the log and replaced.
    A cache folder that cannot be written to only costs the caching (the bank is still returned).

    Returns:
        ``uint8 [len(classes), drawings, image_size, image_size]`` (read-only, memory-mapped when it
        comes from the cache).
    """
    key = bank_key(catalog, classes, style=style, image_size=image_size, drawings=drawings, render_seed=render_seed)

    def render() -> np.ndarray:
        started = time.perf_counter()
        images = render_bank(
            catalog, classes, style=style, image_size=image_size, drawings=drawings, render_seed=render_seed
        )
        seconds = time.perf_counter() - started
        log.info(
            "rendered %d glyph drawings (%s faces, %dpx) in %.1f s (%.0f images/s)",
            images.shape[0] * images.shape[1],
            key["variant"],
            image_size,
            seconds,
            images.shape[0] * images.shape[1] / max(seconds, 1e-9),
        )
        return images

    return cached_bank(
        bank_path(folder, key),
        read=lambda path: _read(path, key),
        make=render,
        write=lambda path, images: _write(path, key, images),
        what="glyph",
        remake="rendering it again",
        logger=log,
    )
