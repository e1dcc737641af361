"""Write site folders in the documented on-disk format from any generated task family or dataset on disk.

``fedmeta make-data`` uses this so that a deployment, a new site or a test can run on real files.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from fedmeta.config import Config
from fedmeta.errors import ConfigError
from fedmeta.rng import make_generator
from fedmeta.tasks import TaskSource, build_family
from fedmeta.tasks.class_folders import is_class_tree
from fedmeta.tasks.folder import write_site

__all__ = ["make_sites", "make_dataset_sites", "DATASET_SOURCES"]

#: The families read from data on disk that make-data turns into site folders (``folder``: a class-folder tree).
DATASET_SOURCES = ("omniglot", "femnist", "hf", "folder")

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
    if cfg.task.name == "folder" and not (cfg.task.data_dir and is_class_tree(cfg.task.data_dir)):
        raise ConfigError(
            "config key 'task.name' is 'folder' and task.data_dir is not a class-folder tree (train/, test/): "
            "make-data writes sites from a generated family (sinusoid, harmonic, glyphs) or a dataset on disk "
            "(omniglot, femnist, hf, a class-folder tree)"
        )
    if cfg.task.name == "glyphs":
        from fedmeta.tasks.glyphs import make_glyph_sites

        return make_glyph_sites(cfg, sites, out, tasks_per_site=tasks_per_site, heldout_per_site=heldout_per_site)
    if cfg.task.name in DATASET_SOURCES:
        return make_dataset_sites(
            cfg, sites, out, tasks_per_site=tasks_per_site, heldout_per_site=heldout_per_site, first=first
        )
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


def make_dataset_sites(
    cfg: Config,
    sites: int,
    out: str | Path,
    *,
    tasks_per_site: int | None = None,
    heldout_per_site: int = 5,
    first: int = 0,
) -> list[Path]:
    """Write ``sites`` site folders from a dataset on disk (omniglot, femnist, hf, a class-folder tree).

    Site ``c`` is federated client ``c`` of the config (``federation.clients_total`` at least
    ``sites`` when ``first`` is 0): each of its ``tasks_per_site`` training tasks (default
    ``task.tasks_per_site`` or 20) is one ``ways``-way episode drawn from that client's own share
    (its partition, writer or classes), stored as ``x [ways * (shots + query), C, H, W]`` and
    ``y`` labels ``0..ways-1``, so that every round draws a fresh support/query split of those
    images; its held-out tasks are episodes of the source's held-out classes (or writers). A site
    past the clients (a deployment server's held-out site) draws its training tasks from the
    whole training split. Tasks of site ``c`` are a function of ``(seed, c)``.

    Raises:
        ConfigError: if a site would be a client beyond ``federation.clients_total``.
        DataFormatError: if the source does not match its documented layout.
    """
    total = cfg.federation.clients_total
    if first == 0 and sites > total:
        raise ConfigError(
            f"--sites {sites} exceeds federation.clients_total ({total}); each site is one federated client's share "
            "of the dataset"
        )
    n_tasks = tasks_per_site or cfg.task.tasks_per_site or 20
    source = TaskSource(cfg)
    root = Path(out)
    written = []

    def draw(c: int, split: str, count: int) -> list[tuple[str, np.ndarray, np.ndarray]]:
        gen = make_generator(cfg.seed, "make-data", split, c)
        # a site past the clients (a deployment server's held-out site) draws from the whole training split
        family = source.family(c if split == "train" and c < total else None)
        batch = family.sample(gen, count, split)
        x = np.concatenate([batch.support_x.numpy(), batch.query_x.numpy()], axis=1)
        y = np.concatenate([batch.support_y.numpy(), batch.query_y.numpy()], axis=1)
        return [(f"{split}-{i:04d}", x[i], y[i]) for i in range(count)]

    for c in range(first, first + sites):
        site = write_site(
            root / f"site-{c:04d}",
            draw(c, "train", n_tasks),
            heldout=draw(c, "eval", heldout_per_site) if heldout_per_site > 0 else None,
            kind="classification",
            name=f"{cfg.task.name} client {c}",
        )
        written.append(site)
    log.info("wrote %d %s site folders under %s", sites, cfg.task.name, root)
    return written
