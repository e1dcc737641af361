"""One meta-gradient engine: an algorithm's outer objective written once, run per task or batched.

An algorithm declares, once:

* what adapts and with which step sizes (:meth:`~fedmeta.algorithms.base.MetaAlgorithm.adapted_keys`,
  :meth:`~fedmeta.algorithms.base.MetaAlgorithm.step_sizes`);
* its outer objective, :meth:`~fedmeta.algorithms.base.MetaAlgorithm.objective`, written against
  :class:`TaskOps` (forward passes, losses, the inner loop) so that the same code computes one
  task's loss or ``T`` stacked tasks' losses ``[T]``;
* how the update follows from it (:attr:`~fedmeta.algorithms.base.MetaAlgorithm.update_rule`):
  ``exact`` — the gradient of the objective with respect to the meta-parameters (MAML, Meta-SGD,
  ANIL, ProtoNets); ``first_order`` — the gradient of the query loss at the adapted parameters,
  the inner loop's Jacobian dropped (FOMAML); ``reptile`` — ``θ - φ``; ``pooled`` — the gradient
  of the loss on all of a task's examples at ``θ`` (FedAvg).

The engine (:func:`task_updates`) runs it in one of two ways with the same per-task results:

* :func:`vmapped_task_updates`: :func:`task_update` (one task, ``torch.func``) under ``vmap``,
  for any model; :func:`task_update` is also what the local-steps path vectorizes over clients;
* :func:`batched_task_updates`: one pass over all tasks with eager autograd, for models whose
  ``forward_tasks`` is native (Conv-4): each task gets its own copy of the meta-parameters
  (``[T, *shape]`` leaves), the per-task losses are summed, and ``torch.autograd.grad`` returns
  each task's gradient in row ``t``.

Objective terms
---------------
:class:`ObjectiveTerm` is a loss on a whole meta-batch: it sees every task and every task's
adapted model (:class:`TermBatch`) and returns one scalar ``R``; a term declares whether it is
``separable_per_task`` (a sum of per-task parts, which task-level DP can clip task by task). With
terms the meta-batch's objective is ``mean_t L_t + R`` and row ``t`` of the update is the
gradient with respect to task ``t``'s copy of the meta-parameters of ``Σ_t L_t + T·R``, so the
mean over rows (what a client sends) is the gradient of that objective. Under the ``first_order``
and ``reptile`` rules, whose updates are not gradients, a term enters first-order: the gradient of
``T·R`` with respect to the detached adapted models (the inner loop's Jacobian dropped, as for the
query loss) plus its gradient with respect to the meta-parameters it reads directly (a term's own
parameters, a feature extractor); for Reptile it is added to ``θ - φ``. A term may own
meta-learned parameters (:meth:`ObjectiveTerm.init_params`, keys ``term.<name>.*``, which the
model never sees). Without terms the engine runs exactly the computation it always did.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor
from torch.func import grad, vmap

from fedmeta.errors import ConfigError
from fedmeta.registry import Registry
from fedmeta.types import LossFn, Params, StepSizes, TaskBatch, model_part

if TYPE_CHECKING:
    from fedmeta.algorithms.base import MetaAlgorithm
    from fedmeta.config import Config
    from fedmeta.models.base import FunctionalModel

__all__ = [
    "TaskOps",
    "PerTaskOps",
    "BatchedOps",
    "ObjectiveTerm",
    "TermBatch",
    "OBJECTIVE_TERMS",
    "UPDATE_RULES",
    "task_update",
    "task_updates",
    "vmapped_task_updates",
    "batched_task_updates",
    "require_separable",
]

#: How an algorithm's update follows from its objective (see the module docstring).
UPDATE_RULES = ("exact", "first_order", "reptile", "pooled")


class TaskOps:
    """The operations an objective is written in: one task (:class:`PerTaskOps`) or ``T`` stacked tasks.

    Each operation picks the model's per-task method or its native batched one (``*_tasks``) by
    :attr:`batched`, so an objective written once in these operations runs either way.

    Args:
        algo: the algorithm whose model and task kind the operations use.
    """

    #: True for stacked tasks (parameters ``[T, *shape]``, inputs ``[T, N, ...]``, losses ``[T]``).
    batched: ClassVar[bool] = False

    def __init__(self, algo: MetaAlgorithm) -> None:
        self.algo = algo
        self.model = algo.model
        self.kind = algo.kind

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """The model's outputs."""
        return self.model.forward_tasks(params, x) if self.batched else self.model.forward(params, x)

    def features(self, params: Params, x: Tensor) -> Tensor:
        """The body's embedding (input of the head)."""
        return self.model.features_tasks(params, x) if self.batched else self.model.features(params, x)

    def head(self, params: Params, h: Tensor) -> Tensor:
        """The head on embeddings."""
        return self.model.head_tasks(params, h) if self.batched else self.model.head(params, h)

    def loss(self, pred: Tensor, y: Tensor) -> Tensor:
        """Task loss: a scalar, or ``[T]``."""
        from fedmeta.algorithms.base import task_loss, task_losses

        return (task_losses if self.batched else task_loss)(self.kind, pred, y)

    def accuracy(self, pred: Tensor, y: Tensor) -> Tensor:
        """Accuracy: a scalar, or ``[T]``."""
        from fedmeta.algorithms.base import task_accuracies, task_accuracy

        return (task_accuracies if self.batched else task_accuracy)(pred, y)

    def sgd(
        self, loss_fn: LossFn, fast: Params, sizes: StepSizes, steps: int, *, first_order: bool = False
    ) -> tuple[Params, Tensor]:
        """``steps`` gradient steps on ``loss_fn``; returns the parameters and the loss before the first step.

        Per task with ``torch.func`` (:func:`~fedmeta.algorithms.base.inner_sgd`), batched with eager
        autograd (:func:`~fedmeta.algorithms.base.eager_inner_sgd`).
        """
        from fedmeta.algorithms.base import eager_inner_sgd, inner_sgd

        run = eager_inner_sgd if self.batched else inner_sgd
        return run(loss_fn, fast, sizes, steps, first_order=first_order)

    def adapt(
        self, meta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool = False
    ) -> tuple[Params, Tensor]:
        """The algorithm's adaptation of the model on ``(x, y)`` (its ``adapt_with_loss`` / ``adapt_tasks``)."""
        run = self.algo.adapt_tasks if self.batched else self.algo.adapt_with_loss
        return run(meta, x, y, steps, first_order=first_order)

    def embed_sets(self, meta: Params, sx: Tensor, qx: Tensor) -> tuple[Params, Tensor, Tensor]:
        """The model part of ``meta`` and the body's embeddings of the support and the query inputs.

        Returns:
            ``(params, hs, hq)``: each set embedded once, for objectives that work on features (ANIL, ProtoNets).
        """
        params = model_part(meta)
        return params, self.features(params, sx), self.features(params, qx)

    def losses_of(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Loss of the model under ``params`` on ``(x, y)``."""
        return self.loss(self.forward(model_part(params), x), y)


class PerTaskOps(TaskOps):
    """One task, traceable by ``torch.func`` (``vmap``, ``grad``)."""

    batched = False


class BatchedOps(TaskOps):
    """``T`` tasks at once with the model's native batched methods and eager autograd."""

    batched = True


# -- objective terms ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TermBatch:
    """What an objective term sees: a whole meta-batch.

    Attributes:
        meta: task ``t``'s copy of the meta-parameters in row ``t`` (``[T, *shape]``; the rows are
            equal in value, and the gradient of the term with respect to row ``t`` is task ``t``'s share).
        adapted: every task's adapted model parameters, stacked ``[T, *shape]``.
        tasks: the meta-batch's tasks.
        ops: the batched operations of the algorithm (forward passes, features, losses on stacked
            parameters), for terms that evaluate models; ``None`` where a caller has none.
    """

    meta: Params
    adapted: Params
    tasks: TaskBatch
    ops: TaskOps | None = None


class ObjectiveTerm(ABC):
    """An extra loss on a whole meta-batch, added to the outer objective (a regularizer, a penalty, a cross-task term).

    Subclasses set :attr:`separable_per_task`: True when the loss is a sum of parts each of which
    depends on one task only (task-level DP can then clip per task); False for a term that
    couples tasks (it is refused there).
    """

    name: ClassVar[str] = ""
    separable_per_task: ClassVar[bool] = True

    @abstractmethod
    def loss(self, batch: TermBatch) -> Tensor:
        """The term's scalar loss on the meta-batch (differentiable in ``batch.meta`` and ``batch.adapted``)."""

    @classmethod
    def from_config(cls, cfg: Config, *, model: FunctionalModel, kind: str) -> ObjectiveTerm:
        """The term a run's config asks for (``meta.regularizer``), for ``model`` and the task ``kind``."""
        return cls()

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Refuse options of this term (``meta.<name>``) or combinations it cannot serve (none by default).

        Raises:
            ConfigError: naming the key.
        """

    @property
    def vanishes(self) -> bool:
        """True when the term is identically zero as configured (e.g. weight 0): it is then not added at all."""
        return False

    def init_params(self, meta: Params, gen: torch.Generator) -> Params:
        """The term's own meta-learned parameters for the initialization ``meta`` (none by default).

        Args:
            meta: the algorithm's initial meta-parameters (for shapes and dtype).
            gen: the run's initialization generator.

        Returns:
            New entries for the meta-parameters, keyed ``term.<name>.<parameter>``.
        """
        return {}


#: Objective terms by name (none is shipped; a term registers itself where it is defined).
OBJECTIVE_TERMS: Registry[type[ObjectiveTerm]] = Registry("objective term", key="meta.terms")


def _terms_loss(terms: Sequence[ObjectiveTerm], batch: TermBatch) -> Tensor:
    total: Tensor | None = None
    for term in terms:
        value = term.loss(batch)
        total = value if total is None else total + value
    assert total is not None
    return total


# -- the engine -----------------------------------------------------------------------------------


def _detached(d: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in d.items()}


def task_update(
    algo: MetaAlgorithm, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
) -> tuple[Params, dict[str, Tensor]]:
    """One task's update (meta-gradient or pseudo-gradient) and metrics, with ``torch.func`` (``vmap``-able).

    Returns:
        A dict with the keys and shapes of ``meta`` and a dict of scalar metrics.
    """
    ops = PerTaskOps(algo)
    rule = algo.update_rule
    if rule == "exact":

        def outer(m: Params) -> tuple[Tensor, dict[str, Tensor]]:
            loss, state = algo.objective(ops, m, sx, sy, qx, qy)
            return loss, algo.metrics(ops, m, state, sx, sy, qx, qy)

        grads, metrics = grad(outer, has_aux=True)(meta)
        return grads, metrics
    if rule == "pooled":
        x, y = torch.cat([sx, qx]), torch.cat([sy, qy])
        g = grad(lambda p: ops.losses_of(p, x, y))(meta)
        state = algo.adaptation_state(ops, meta, sx, sy)
        return g, algo.metrics(ops, meta, state, sx, sy, qx, qy)
    state = algo.adaptation_state(ops, meta, sx, sy)
    adapted = _detached(state["adapted"])
    state = {**state, "adapted": adapted}
    if rule == "first_order":
        g = grad(lambda p: ops.losses_of(p, qx, qy))(adapted)
        update = {k: g[k] for k in meta}
    elif rule == "reptile":
        update = {k: meta[k] - adapted[k] for k in meta}
    else:
        raise ValueError(f"unknown update rule {rule!r} (one of {', '.join(UPDATE_RULES)})")
    return update, algo.metrics(ops, meta, state, sx, sy, qx, qy)


def vmapped_task_updates(
    algo: MetaAlgorithm, meta: Params, tasks: TaskBatch, terms: Sequence[ObjectiveTerm] = ()
) -> tuple[Params, dict[str, Tensor]]:
    """:func:`task_update` vectorized over tasks with ``vmap``; with ``terms``, :func:`batched_task_updates`.

    Terms see the whole meta-batch, so they always run on the batched eager path, which serves
    every model (a model without native batching runs its single-task methods under ``vmap``
    there). ``torch.func.grad`` of a ``vmap`` over tasks would also give them, but PyTorch 2.13
    mis-differentiates batch normalization's double backward in that nesting (gradients off by
    ~1e-3 in float64), so it is not used.
    """
    if terms:
        return batched_task_updates(algo, meta, tasks, terms)
    fn: Callable[..., tuple[Params, dict[str, Tensor]]] = vmap(partial(task_update, algo), in_dims=(None, 0, 0, 0, 0))
    grads, metrics = fn(meta, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
    return _detached(grads), _detached(metrics)


def batched_task_updates(
    algo: MetaAlgorithm, meta: Params, tasks: TaskBatch, terms: Sequence[ObjectiveTerm] = ()
) -> tuple[Params, dict[str, Tensor]]:
    """The same per-task updates as :func:`vmapped_task_updates`, from one batched pass with eager autograd."""
    from fedmeta.algorithms.base import grad_dict, stack_for_tasks

    ops = BatchedOps(algo)
    rule = algo.update_rule
    stacked = stack_for_tasks(meta, tasks.num_tasks)
    sx, sy, qx, qy = tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
    if terms and rule not in ("exact", "first_order", "reptile"):
        raise ValueError(f"objective terms need an update rule that adapts; {algo.name!r} has {rule!r}")
    if rule == "exact":
        with torch.enable_grad():
            losses, state = algo.objective(ops, stacked, sx, sy, qx, qy)
            total = losses.sum()
            if terms:
                total = total + tasks.num_tasks * _terms_loss(
                    terms, TermBatch(stacked, algo.adapted_model(state), tasks, ops)
                )
            grads = grad_dict(total, stacked)
        with torch.no_grad():
            metrics = algo.metrics(ops, stacked, state, sx, sy, qx, qy)
        return grads, metrics
    if rule == "pooled":
        x, y = torch.cat([sx, qx], dim=1), torch.cat([sy, qy], dim=1)
        with torch.enable_grad():
            g = grad_dict(ops.losses_of(stacked, x, y).sum(), stacked)
        state = algo.adaptation_state(ops, stacked, sx, sy)
        with torch.no_grad():
            return g, algo.metrics(ops, stacked, state, sx, sy, qx, qy)
    state = algo.adaptation_state(ops, stacked, sx, sy)
    adapted = state["adapted"]
    if terms:
        return _first_order_with_terms(algo, ops, stacked, state, tasks, terms)
    if rule == "first_order":
        leaves = {k: v.detach().requires_grad_(True) for k, v in adapted.items()}
        with torch.enable_grad():
            pred = ops.forward(leaves, qx)
            g = grad_dict(ops.loss(pred, qy).sum(), leaves)
        state = {**state, "query_pred_post": pred.detach()}
        update = {k: g[k] for k in meta}
    elif rule == "reptile":
        update = {k: stacked[k].detach() - adapted[k] for k in meta}
    else:
        raise ValueError(f"unknown update rule {rule!r} (one of {', '.join(UPDATE_RULES)})")
    with torch.no_grad():
        return update, algo.metrics(ops, stacked, state, sx, sy, qx, qy)


def _first_order_with_terms(
    algo: MetaAlgorithm,
    ops: BatchedOps,
    stacked: Params,
    state: dict[str, Tensor | Params],
    tasks: TaskBatch,
    terms: Sequence[ObjectiveTerm],
) -> tuple[Params, dict[str, Tensor]]:
    """FOMAML's or Reptile's update with objective terms entering first-order (module docstring).

    FOMAML: ``∇_φ [L_q(φ_t) + T·R]`` on the detached adapted models plus ``∇_θ T·R`` through what
    the terms read of the meta-parameters directly. Reptile: ``θ - φ_t`` plus the same term gradients.
    """
    from fedmeta.algorithms.base import grad_dict

    adapted = state["adapted"]
    assert isinstance(adapted, dict)
    leaves = {k: v.detach().requires_grad_(True) for k, v in adapted.items()}
    qx, qy = tasks.query_x, tasks.query_y
    with torch.enable_grad():
        total = tasks.num_tasks * _terms_loss(terms, TermBatch(stacked, leaves, tasks, ops))
        if algo.update_rule == "first_order":
            pred = ops.forward(leaves, qx)
            total = total + ops.loss(pred, qy).sum()
            state = {**state, "query_pred_post": pred.detach()}
        both = grad_dict(total, {**{f"adapted:{k}": v for k, v in leaves.items()}, **stacked})
    g_adapted = {k: both[f"adapted:{k}"] for k in leaves}
    g_meta = {k: both[k] for k in stacked}
    update: Params = {}
    for k, g in g_meta.items():
        if k in leaves:
            g = g + g_adapted[k]
            if algo.update_rule == "reptile":
                g = g + (stacked[k].detach() - adapted[k])
        update[k] = g
    with torch.no_grad():
        return update, algo.metrics(ops, stacked, state, tasks.support_x, tasks.support_y, qx, qy)


def task_updates(
    algo: MetaAlgorithm, meta: Params, tasks: TaskBatch, terms: Sequence[ObjectiveTerm] = ()
) -> tuple[Params, dict[str, Tensor]]:
    """Per-task updates of a meta-batch: batched for a native multi-task model (or with terms), else ``vmap``.

    Returns:
        ``({name: [T, *shape]}, {metric: [T]})``, detached.
    """
    if algo.model.batched_tasks or terms:
        return batched_task_updates(algo, meta, tasks, terms)
    return vmapped_task_updates(algo, meta, tasks, terms)


def require_separable(terms: Sequence[ObjectiveTerm], *, why: str) -> None:
    """Refuse terms that couple the tasks of a meta-batch where each task must stand alone.

    Raises:
        ConfigError: naming the first non-separable term and ``why`` (e.g. task-level DP).
    """
    for term in terms:
        if not term.separable_per_task:
            raise ConfigError(
                f"objective term {term.name or type(term).__name__!r} couples the tasks of a meta-batch: {why}"
            )
