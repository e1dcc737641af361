"""One object that turns a config into the pieces every path needs: tasks, model, algorithm.

The centralized reference, the Flower client and server, and ``fedmeta adapt`` all build an
:class:`Experiment`, so they agree on the model, the initial meta-parameters and the tasks.
"""

from __future__ import annotations

import logging
import platform
from typing import Any

import torch

from fedmeta.aggregation import build_aggregator
from fedmeta.algorithms import MetaAlgorithm, MetaUpdate, build_algorithm
from fedmeta.algorithms.engine import OBJECTIVE_TERMS
from fedmeta.config import Config, to_dict
from fedmeta.evaluation import EvalResult, evaluate
from fedmeta.local_update import local_meta_update, local_meta_updates
from fedmeta.models import FunctionalModel, build_model
from fedmeta.optim import ServerOptimizer
from fedmeta.rng import make_generator
from fedmeta.sampling import sample_clients
from fedmeta.tasks import TaskFamily, TaskSource
from fedmeta.types import Params, TaskBatch

__all__ = ["Experiment", "RoundResult", "build_summary"]

log = logging.getLogger(__name__)


class RoundResult:
    """What one round produced: per-client updates stacked, their weights, and metrics.

    Attributes:
        clients: the client ids, in the order of the stacked updates.
        updates: ``{key: [C, *shape]}``, each client's mean meta-update.
        weights: each client's task count (float64).
        metrics: means over all of the round's tasks.
        client_metrics: each client's means over its own tasks (what it would send alone).
    """

    def __init__(
        self,
        clients: list[int],
        updates: Params,
        weights: torch.Tensor,
        metrics: dict[str, float],
        client_metrics: list[dict[str, float]] | None = None,
    ) -> None:
        self.clients = clients
        self.updates = updates
        self.weights = weights
        self.metrics = metrics
        self.client_metrics = client_metrics if client_metrics is not None else [{} for _ in clients]


class Experiment:
    """Tasks, model and algorithm for a config.

    Args:
        cfg: the run configuration.
        data_dir: a site folder (or folder of sites) overriding ``task.data_dir``.
        family: the task family every client draws from, instead of the config's (its kind and
            shapes define the model; a deployment server without site data passes one built from
            the sites' start-up answers).
    """

    def __init__(self, cfg: Config, *, data_dir: str | None = None, family: TaskFamily | None = None) -> None:
        self.cfg = cfg
        self.source = TaskSource(cfg, data_dir=data_dir, family=family)
        family = self.source.family(None)
        self.kind = family.kind
        self.model: FunctionalModel = build_model(cfg, family.input_shape, family.output_dim)
        self.algorithm: MetaAlgorithm = build_algorithm(
            cfg.meta.algorithm,
            self.model,
            kind=family.kind,
            inner_lr=cfg.meta.inner_lr,
            inner_steps=cfg.meta.inner_steps,
            head_init=cfg.meta.head_init,
        )
        if cfg.meta.regularizer != "none":
            term = OBJECTIVE_TERMS.get(cfg.meta.regularizer).from_config(cfg, model=self.model, kind=family.kind)
            if not term.vanishes:
                self.algorithm.with_terms(term)
        if cfg.generators.constraints:
            from fedmeta.generators.constraints import ConstraintTerm

            self.algorithm.with_terms(ConstraintTerm.from_config(cfg, model=self.model, kind=family.kind))

    def initial_meta_params(self) -> Params:
        """The round-0 meta-parameters, a function of the seed only.

        An objective term's own parameters (TRLearner's relation heads) come from a generator of
        their own, so the model's initialization is the same with and without the term.
        """
        meta = self.algorithm.init_meta_params(make_generator(self.cfg.seed, "init"))
        for term in self.algorithm.terms:
            meta.update(term.init_params(meta, make_generator(self.cfg.seed, "init", "term", term.name)))
        return meta

    def server_optimizer(self, meta: Params) -> ServerOptimizer:
        """The outer optimizer configured by ``meta.outer_optimizer`` / ``meta.outer_lr``."""
        m = self.cfg.meta
        return ServerOptimizer(meta, name=m.outer_optimizer, lr=m.outer_lr, momentum=m.outer_momentum)

    def sample_round(self, round_idx: int) -> list[int]:
        """The client ids taking part in ``round_idx`` (the same on every path)."""
        f = self.cfg.federation
        return sample_clients(self.cfg.seed, round_idx, f.clients_total, f.clients_per_round, method=f.sampling)

    def client_update(self, meta: Params, round_idx: int, client_id: int, tasks: TaskBatch | None = None) -> MetaUpdate:
        """What client ``client_id`` computes in ``round_idx``: its mean meta-gradient and metrics.

        With ``meta.local_steps > 1`` it is the pseudo-gradient of that many local meta-steps,
        each on its own meta-batch (:func:`fedmeta.local_update.local_meta_update`); ``tasks``
        then replaces the first step's batch only.
        """
        steps = self.cfg.meta.local_steps
        first = tasks if tasks is not None else self.source.client_tasks(round_idx, client_id)
        if steps == 1:
            return self.algorithm.meta_gradient(meta, first)
        batches = [first] + [self.source.client_tasks(round_idx, client_id, step=s) for s in range(1, steps)]
        return local_meta_update(self.algorithm, meta, batches, lr=self.cfg.meta.local_step_size)

    def round_updates(self, meta: Params, round_idx: int, clients: list[int]) -> RoundResult:
        """Every sampled client's update for one round, computed in a single vectorized pass.

        All clients' tasks are concatenated and their per-task meta-gradients computed with one
        ``vmap``; each client's update is then the mean over its own tasks, exactly what
        :meth:`client_update` returns for it. With ``meta.local_steps > 1`` every client's
        parameters move apart during its local steps; :func:`fedmeta.local_update.local_meta_updates`
        then vectorizes over clients as well (the Flower client runs the same function for one).
        """
        steps = self.cfg.meta.local_steps
        if steps > 1:
            step_batches = [[self.source.client_tasks(round_idx, c, step=s) for c in clients] for s in range(steps)]
            updates = local_meta_updates(self.algorithm, meta, step_batches, lr=self.cfg.meta.local_step_size)
            weights = torch.tensor([u.num_tasks for u in updates], dtype=torch.float64)
            total = float(weights.sum())
            mean_metrics = {
                k: sum(u.metrics[k] * u.num_tasks for u in updates) / total for k in updates[0].metrics
            }
            stacked = {k: torch.stack([u.gradient[k] for u in updates]) for k in updates[0].gradient}
            return RoundResult(clients, stacked, weights, mean_metrics, [dict(u.metrics) for u in updates])
        batches = [self.source.client_tasks(round_idx, c) for c in clients]
        tasks = TaskBatch.concat(batches)
        if self.algorithm.terms:
            # a term relates the tasks of one client's meta-batch only: one pass per client
            parts = [self.algorithm.task_updates(meta, b) for b in batches]
            grads = {k: torch.cat([g[k] for g, _ in parts]) for k in parts[0][0]}
            metrics = {k: torch.cat([m[k] for _, m in parts]) for k in parts[0][1]}
        else:
            grads, metrics = self.algorithm.task_updates(meta, tasks)
        sizes = torch.tensor([b.num_tasks for b in batches])
        # each client's mean over its own tasks, as one scatter-add (no loop over clients)
        owner = torch.repeat_interleave(torch.arange(len(clients)), sizes)
        per_client = {
            k: torch.zeros((len(clients), *v.shape[1:]), dtype=v.dtype).index_add_(0, owner, v)
            / sizes.to(v.dtype).view(-1, *([1] * (v.dim() - 1)))
            for k, v in grads.items()
        }
        mean_metrics = {k: float(v.mean()) for k, v in metrics.items()}
        client_means = {
            k: torch.zeros(len(clients), dtype=torch.float64).index_add_(0, owner, v.double()) / sizes.double()
            for k, v in metrics.items()
        }
        client_metrics = [{k: float(v[i]) for k, v in client_means.items()} for i in range(len(clients))]
        return RoundResult(clients, per_client, sizes.to(torch.float64), mean_metrics, client_metrics)

    def aggregate(self, result: RoundResult) -> Params:
        """Combine a round's client updates with the configured aggregation rule."""
        return build_aggregator(self.cfg).aggregate(result.updates, result.weights)

    def evaluate(self, meta: Params, tasks: TaskBatch | None = None) -> EvalResult:
        """Adapt to held-out tasks (``eval.tasks`` of them unless given) and measure."""
        if tasks is None:
            tasks = self.source.eval_tasks()
        return evaluate(self.algorithm, meta, tasks, steps=self.cfg.eval.steps, batch=self.cfg.eval.batch)


def build_summary(
    cfg: Config,
    *,
    mode: str,
    rounds_completed: int,
    final: dict[str, Any],
    privacy: dict[str, Any] | None,
    wall_seconds: float,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The ``summary.json`` contract of SPEC §9 (keys are only ever added)."""
    p = cfg.privacy
    priv = privacy or {
        "mode": "none",
        "epsilon": None,
        "delta": p.delta,
        "noise_multiplier": None,
        "clip_norm": None,
        "accountant": None,
    }
    out = {
        "mode": mode,
        "algorithm": cfg.meta.algorithm,
        "task": cfg.task.name,
        "model": cfg.model.name,
        "seed": cfg.seed,
        "rounds_planned": cfg.federation.rounds,
        "rounds_completed": rounds_completed,
        "clients_total": cfg.federation.clients_total,
        "clients_per_round": cfg.federation.clients_per_round,
        "tasks_per_client": cfg.meta.tasks_per_client,
        "final": final,
        "privacy": priv,
        "wall_seconds": wall_seconds,
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
        },
        "config": to_dict(cfg),
    }
    if extra:
        out.update(extra)
    return out
