"""Write site folders in the documented on-disk format from any generated task family.

``fedmeta make-data`` uses this so that a deployment, a new site or a test can run on real files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedmeta.config import Config
from fedmeta.errors import ConfigError
from fedmeta.rng import make_generator
from fedmeta.tasks import build_family
from fedmeta.tasks.folder import write_site

__all__ = ["make_sites"]

log = logging.getLogger(__name__)


def make_sites(
    cfg: Config,
    sites: int,
    out: str | Path,
    *,
    tasks_per_site: int | None = None,
    heldout_per_site: int = 5,
    examples_per_task: int | None = None,
    first: int = 0,
) -> list[Path]:
    """Write ``sites`` site folders ``out/site-0000 ...`` for the config's task family.

    Each site holds ``tasks_per_site`` training tasks (``task.tasks_per_site``, default 20) in
    ``tasks/`` and ``heldout_per_site`` held-out tasks in ``heldout/``. A regression task stores
    ``examples_per_task`` points (default ``2 * (shots + query)``) so that every round can draw
    a fresh support/query split. Tasks of site ``c`` are a function of ``(seed, c)``; sites are
    numbered from ``first`` (a server's held-out site is written as the site after the clients').

    Raises:
        ConfigError: if the family cannot be written as site folders (e.g. ``folder`` itself).
    """
    if sites < 1:
        raise ConfigError(f"--sites must be at least 1, got {sites}")
    if cfg.task.name == "folder":
        raise ConfigError(
            "config key 'task.name' is 'folder': make-data writes sites from a generated family (sinusoid, harmonic, "
            "glyphs)"
        )
    if cfg.task.name == "glyphs":
        from fedmeta.tasks.glyphs import make_glyph_sites

        return make_glyph_sites(cfg, sites, out, tasks_per_site=tasks_per_site, heldout_per_site=heldout_per_site)
    n_tasks = tasks_per_site or cfg.task.tasks_per_site or 20
    n_examples = examples_per_task or 2 * (cfg.task.shots + cfg.task.query)
    family = build_family(cfg)
    # draw examples_per_task points per task by asking the family for that many "support" points
    from dataclasses import replace

    wide = build_family(replace(cfg, task=replace(cfg.task, shots=n_examples, query=1)))
    root = Path(out)
    written = []

    def draw(c: int, split: str, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        gen = make_generator(cfg.seed, "make-data", split, c)
        batch = wide.make_tasks(family.sample_params(gen, count, split), gen)
        return [
            (f"{split}-{i:04d}", batch.support_x[i].numpy(), batch.support_y[i].numpy()) for i in range(count)
        ]

    for c in range(first, first + sites):
        site = write_site(
            root / f"site-{c:04d}",
            draw(c, "train", n_tasks),
            heldout=draw(c, "eval", heldout_per_site) if heldout_per_site > 0 else None,
            kind=family.kind,
        )
        written.append(site)
    log.info("wrote %d site folders under %s", sites, root)
    return written
