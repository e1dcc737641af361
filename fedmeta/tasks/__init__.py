"""Task families and the rules by which clients and evaluation draw tasks from them.

:data:`TASK_FAMILIES` registers the families by ``task.name``; each family class owns its name,
how it is built from its ``task.*`` options (``from_config``), their validation
(``check_config``) and the models its tasks fit (``models``).

:class:`TaskSource` is the one place that decides which tasks client ``c`` sees in round ``r``
and which tasks are held out for evaluation. The centralized reference and the Flower client
both call it, so the same seed gives the same tasks on both paths.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch

from fedmeta.config import Config
from fedmeta.errors import ConfigError
from fedmeta.registry import Registry
from fedmeta.rng import make_generator
from fedmeta.tasks.base import SPLITS, TaskFamily
from fedmeta.tasks.class_folders import is_class_tree
from fedmeta.tasks.femnist import FemnistFamily
from fedmeta.tasks.folder import FolderFamily, list_sites
from fedmeta.tasks.glyphs.family import GlyphFamily
from fedmeta.tasks.hf import HFFamily
from fedmeta.tasks.omniglot import OmniglotFamily
from fedmeta.tasks.regression import HarmonicFamily, SinusoidFamily
from fedmeta.types import TaskBatch

__all__ = ["TaskFamily", "TaskSource", "build_family", "TASK_FAMILIES", "SPLITS"]

#: The task families by ``task.name``, in the order messages list them (the default first).
TASK_FAMILIES = Registry[type[TaskFamily]]("task family", key="task.name")
TASK_FAMILIES.add(SinusoidFamily.name, SinusoidFamily)
TASK_FAMILIES.add(HarmonicFamily.name, HarmonicFamily)
TASK_FAMILIES.add(GlyphFamily.name, GlyphFamily)
TASK_FAMILIES.add(FolderFamily.name, FolderFamily)
TASK_FAMILIES.add(OmniglotFamily.name, OmniglotFamily)
TASK_FAMILIES.add(FemnistFamily.name, FemnistFamily)
TASK_FAMILIES.add(HFFamily.name, HFFamily)


def build_family(cfg: Config, *, site: str | Path | None = None) -> TaskFamily:
    """Build the task family named by ``cfg.task.name``.

    Args:
        cfg: the run configuration.
        site: for the ``folder`` family, the site folder to read (defaults to ``task.data_dir``).

    Raises:
        ConfigError: for an unknown family name (naming ``task.name`` and the known names).
        DataFormatError: if a site folder does not match the documented format.
    """
    return TASK_FAMILIES.get(cfg.task.name).from_config(cfg, site=site)


class TaskSource:
    """Which tasks each client trains on, round by round, and which tasks are held out.

    * Generated families (sinusoid, harmonic): every client samples from the whole family. With
      ``task.tasks_per_site = n`` a client holds a fixed private pool of ``n`` tasks (drawn once
      from ``(seed, client)``) and each round picks ``meta.tasks_per_client`` of them with fresh
      support/query examples; with ``null`` it draws new tasks every round (MAML's setting).
    * ``folder``: client ``c`` reads the ``c``-th site of ``task.data_dir`` (a folder of sites),
      one client per site; a folder with fewer sites than ``federation.clients_total`` is refused.
      One site (``task.data_dir`` names a site) is client 0's; a node given its own ``data_dir``
      (a SuperNode's ``data-dir``) reads it whatever its client id. Several clients reading one
      site (client ``c`` reads site ``c mod sites``) only with ``task.share_sites: true``, which
      every DP mode refuses: one site's data entering as several clients voids a per-client or
      per-task guarantee. A ``task.data_dir`` in the class-folder split layout (``train/``,
      ``test/``: :mod:`fedmeta.tasks.class_folders`) is read as a whole instead: client ``c``
      holds its ``task.partition`` share of the ``train`` classes, evaluation uses ``test``.
    * ``glyphs``, ``omniglot``: client ``c`` sees only its own partition of the background
      alphabets (the families whose ``per_client`` is set build each client's share).
    * ``femnist``: client ``c`` is writer ``c``; evaluation tasks come from held-out writers.
    * ``hf``: client ``c`` holds partition ``c`` of the background classes' rows (Flower Datasets'
      partitioner, ``task.hf.partitioner``); evaluation tasks come from the held-out classes.

    Randomness comes from ``(seed, purpose, round, client)`` only, never from global state.
    """

    def __init__(self, cfg: Config, *, data_dir: str | Path | None = None, family: TaskFamily | None = None) -> None:
        self.cfg = cfg
        self._families: dict[int, TaskFamily] = {}
        self._sites: list[Path] | None = None
        # a class-folder tree (train/, test/) is read as a whole, each client holding a share of its classes
        self._per_client = TASK_FAMILIES.get(cfg.task.name).per_client
        if family is not None:
            # every client draws from `family` (a deployment server that holds no site data
            # passes one that only describes the sites' shapes, from their start-up answers)
            self._shared: TaskFamily | None = family
            return
        # a folder given to this node itself (a SuperNode's data-dir) is its own site, whatever its id
        self._own_folder = data_dir is not None
        if cfg.task.name == "folder":
            root = data_dir if data_dir is not None else cfg.task.data_dir
            if root is None:
                raise ConfigError("config key 'task.data_dir' must name a site folder for task.name 'folder'")
            self._root = Path(root)
        if cfg.task.name == "folder" and is_class_tree(self._root):
            self._per_client = True
            if data_dir is not None:  # a node's own tree: its families read it, not the config's
                self.cfg = replace(cfg, task=replace(cfg.task, data_dir=str(self._root)))
        elif cfg.task.name == "folder":
            self._sites = list_sites(self._root)
            total = cfg.federation.clients_total
            if len(self._sites) > 1 and len(self._sites) < total and not cfg.task.share_sites:
                raise ConfigError(
                    f"data folder '{root}' holds {len(self._sites)} sites but federation.clients_total is {total}: "
                    "each client is one site (client c reads the c-th site); add sites, lower "
                    "federation.clients_total, or set task.share_sites true to let clients share sites "
                    "(refused under differential privacy)"
                )
        self._shared = None if self._sites is not None and len(self._sites) > 1 else self._build(None)

    def site_of(self, client_id: int) -> Path:
        """The site folder client ``client_id`` reads (``folder`` family only).

        Raises:
            ConfigError: when the client has no site of its own and ``task.share_sites`` is false,
                naming the folder, ``federation.clients_total`` and ``task.share_sites``.
        """
        sites = self._sites
        if sites is None:
            raise ValueError("site_of is for task.name 'folder'")
        if len(sites) == 1 and self._own_folder:
            return sites[0]
        if client_id < len(sites):
            return sites[client_id]
        if not self.cfg.task.share_sites:
            raise ConfigError(
                f"client {client_id} has no site of its own: data folder '{self._root}' holds {len(sites)} "
                f"site(s) for federation.clients_total={self.cfg.federation.clients_total} clients (client c "
                "reads the c-th site); add sites, lower federation.clients_total, or set task.share_sites true "
                "to let clients share sites (refused under differential privacy)"
            )
        return sites[client_id % len(sites)]

    def _build(self, client_id: int | None) -> TaskFamily:
        if self._sites is not None:
            site = self._sites[0] if client_id is None else self.site_of(client_id)
            return build_family(self.cfg, site=site)
        if client_id is not None and self._per_client:
            return TASK_FAMILIES.get(self.cfg.task.name).for_client(self.cfg, client_id)
        return build_family(self.cfg)

    @property
    def num_sites(self) -> int | None:
        """Number of on-disk sites for the ``folder`` family, else ``None``."""
        return None if self._sites is None else len(self._sites)

    def family(self, client_id: int | None = None) -> TaskFamily:
        """The task family client ``client_id`` draws from (``None``: the whole family)."""
        own_share = client_id is not None and self._per_client
        if self._shared is not None and not own_share:
            if self._sites is not None and client_id is not None:
                self.site_of(client_id)  # one site read by several clients only with task.share_sites
            return self._shared
        key = -1 if client_id is None else client_id
        if key not in self._families:
            self._families[key] = self._build(client_id)
        return self._families[key]

    def client_tasks(self, round_idx: int, client_id: int, step: int = 0) -> TaskBatch:
        """The ``meta.tasks_per_client`` tasks client ``client_id`` trains on in round ``round_idx``.

        ``step`` numbers the local meta-steps of a round (``meta.local_steps > 1``): each step
        draws its own meta-batch; step 0 is the round's only batch otherwise.
        """
        cfg = self.cfg
        fam = self.family(client_id)
        n = cfg.meta.tasks_per_client
        extra = (step,) if step else ()
        gen = make_generator(cfg.seed, "train", round_idx, client_id, *extra)
        pool = cfg.task.tasks_per_site
        if pool is None or self._sites is not None:
            return fam.sample(gen, n, "train")
        site_params = fam.sample_params(make_generator(cfg.seed, "site", client_id), pool, "train")
        chosen = torch.randperm(pool, generator=make_generator(cfg.seed, "pick", round_idx, client_id, *extra))[:n]
        return fam.make_tasks(site_params[chosen], gen)

    def site_pool(self, client_id: int) -> torch.Tensor | None:
        """Parameters of the fixed task pool of a client (``None`` when tasks are drawn fresh)."""
        if self.cfg.task.tasks_per_site is None or self._sites is not None:
            return None
        fam = self.family(client_id)
        return fam.sample_params(
            make_generator(self.cfg.seed, "site", client_id), self.cfg.task.tasks_per_site, "train"
        )

    def eval_tasks(self, n: int | None = None) -> TaskBatch:
        """The held-out evaluation tasks (fixed for a seed; never used in training).

        With ``eval.data_dir`` set they are the ``heldout/`` tasks of the site(s) there, which no
        client reads; otherwise those of ``task.data_dir``'s sites (folder) or the family's
        evaluation split.
        """
        n = self.cfg.eval.tasks if n is None else n
        gen = make_generator(self.cfg.seed, "eval")
        if self.cfg.eval.data_dir:
            held = list_sites(self.cfg.eval.data_dir)
            per = -(-n // len(held))
            parts = [build_family(self.cfg, site=site).sample(gen, per, "eval") for site in held]
            return TaskBatch.concat(parts).slice(0, n)
        if self.cfg.eval.task.overrides():  # held-out tasks from other ranges (eval.task)
            from fedmeta.config import evaluation_config

            return build_family(evaluation_config(self.cfg)).sample(gen, n, "eval")
        if self._sites is not None and len(self._sites) > 1:
            per_site = -(-n // len(self._sites))
            parts = [self.family(c).sample(gen, per_site, "eval") for c in range(len(self._sites))]
            return TaskBatch.concat(parts).slice(0, n)
        return self.family(None).sample(gen, n, "eval")
