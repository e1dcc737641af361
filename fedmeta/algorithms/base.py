"""What every meta-learning algorithm shares: losses, the functional inner loop, batching over tasks.

An algorithm is one class with one signature. :meth:`MetaAlgorithm.task_update` takes the
meta-parameters and *one* task and returns that task's meta-gradient (or, for Reptile and FedAvg,
the pseudo-gradient the server optimizer treats the same way) plus per-task metrics.
:meth:`MetaAlgorithm.task_updates` batches it over tasks, so no Python loop over tasks runs on
the hot path, in one of two ways that give the same per-task results:

* ``vmap`` of :meth:`~MetaAlgorithm.task_update` (nested ``torch.func.grad``), for any model;
* the *batched eager* path, :meth:`~MetaAlgorithm.batched_task_updates`, when the model computes
  all tasks in one native pass (:attr:`fedmeta.models.base.FunctionalModel.batched_tasks`, e.g.
  Conv-4's grouped convolutions). Each task gets its own copy of the meta-parameters (a
  ``[T, *shape]`` leaf), the per-task losses are summed, and ``torch.autograd.grad`` — with
  ``create_graph=True`` through the inner loop for second order — returns each task's
  meta-gradient in row ``t``, because task ``t``'s loss depends on row ``t`` only. On the CPU this
  avoids ``vmap``'s per-operator batching overhead (docs/glyphs.md, "Speed").

Nothing here mutates the meta-parameters.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, grad_and_value

from fedmeta.algorithms import engine
from fedmeta.algorithms.engine import ObjectiveTerm, PerTaskOps, TaskOps
from fedmeta.errors import ConfigError
from fedmeta.models.base import FunctionalModel
from fedmeta.registry import Registry
from fedmeta.types import LR_PREFIX, LossFn, Params, StepSizes, TaskBatch, lr_part, model_part

__all__ = [
    "ALGORITHMS",
    "MetaAlgorithm",
    "MetaUpdate",
    "task_loss",
    "task_accuracy",
    "adaptation_start",
    "task_losses",
    "task_accuracies",
    "stack_for_tasks",
    "grad_dict",
    "inner_sgd",
    "eager_inner_sgd",
    "metric_dict",
    "class_prototypes",
    "METRIC_NAMES",
]

#: Per-task metrics every algorithm reports (means over a client's tasks leave the client).
METRIC_NAMES = ("support_loss_pre", "support_loss_post", "query_loss_pre", "query_loss_post")


def adaptation_start(meta: Params, *, first_order: bool = False) -> Params:
    """The model parameters an adaptation starts from: ``meta``'s model part, detached when first-order.

    Args:
        meta: the meta-parameters (Meta-SGD's learning rates are left out).
        first_order: detach them, so that no gradient flows back into ``meta`` through the adaptation.

    Returns:
        The model parameters, the same tensors as in ``meta`` unless detached.
    """
    params = model_part(meta)
    if first_order:
        params = {k: v.detach() for k, v in params.items()}
    return params


def task_loss(kind: str, pred: Tensor, y: Tensor) -> Tensor:
    """Mean squared error (regression) or cross-entropy (classification) over one task's examples."""
    if kind == "classification":
        return F.cross_entropy(pred, y)
    return F.mse_loss(pred, y)


def class_prototypes(h: Tensor, y: Tensor, ways: int) -> tuple[Tensor, Tensor]:
    """Mean embedding of each class's examples, and how many examples each class has.

    Args:
        h: embeddings ``[..., N, F]``.
        y: labels ``[..., N]`` in ``0..ways-1``.
        ways: number of classes.

    Returns:
        ``(prototypes [..., W, F], counts [..., W])``; a class without examples gets a zero
        prototype and count 0. Leading task dimensions are carried through; ``vmap``-safe (no
        data-dependent shapes).
    """
    onehot = (y.unsqueeze(-1) == torch.arange(ways, device=y.device)).to(h.dtype)  # [..., N, W]
    counts = onehot.sum(dim=-2)  # [..., W]
    prototypes = onehot.transpose(-1, -2) @ h / counts.clamp(min=1.0).unsqueeze(-1)  # [..., W, F]
    return prototypes, counts


def task_accuracy(pred: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct argmax predictions."""
    return (pred.argmax(dim=-1) == y).float().mean()


def task_losses(kind: str, pred: Tensor, y: Tensor) -> Tensor:
    """:func:`task_loss` of ``T`` tasks at once: predictions ``[T, N, ...]`` against targets ``[T, N, ...]``.

    Returns:
        The per-task losses ``[T]``.
    """
    tasks = pred.shape[0]
    if kind == "classification":
        return F.cross_entropy(pred.flatten(0, 1), y.flatten(0, 1), reduction="none").view(tasks, -1).mean(dim=1)
    return (pred - y).pow(2).reshape(tasks, -1).mean(dim=1)


def task_accuracies(pred: Tensor, y: Tensor) -> Tensor:
    """:func:`task_accuracy` of ``T`` tasks at once, ``[T]``."""
    return (pred.argmax(dim=-1) == y).float().mean(dim=1)


def stack_for_tasks(meta: Params, tasks: int) -> Params:
    """One detached copy of every parameter per task, ``[tasks, *shape]``, each a leaf that requires grad.

    The gradient of a sum of per-task losses with respect to these copies holds each task's own
    gradient in its row: this is how the batched eager path gets per-task meta-gradients.
    """
    return {k: v.detach().unsqueeze(0).expand(tasks, *v.shape).clone().requires_grad_(True) for k, v in meta.items()}


def grad_dict(output: Tensor, inputs: Params, *, create_graph: bool = False) -> Params:
    """``torch.autograd.grad`` on a dict; inputs the output does not depend on get zeros.

    Zeros, not ``None``, as ``torch.func.grad`` gives.
    """
    keys = list(inputs)
    found = torch.autograd.grad(output, [inputs[k] for k in keys], create_graph=create_graph, allow_unused=True)
    return {k: torch.zeros_like(inputs[k]) if g is None else g for k, g in zip(keys, found)}


def inner_sgd(
    loss_fn: LossFn, fast: Params, sizes: StepSizes, steps: int, *, first_order: bool = False
) -> tuple[Params, Tensor]:
    """``steps`` plain gradient steps ``p - size * grad`` on ``loss_fn``.

    Written with ``torch.func``, so it nests in ``vmap``/``grad``.

    Returns the stepped parameters and the loss before the first step (detached). With
    ``first_order`` the inner gradients are treated as constants.
    """
    start_loss = None
    for _ in range(steps):
        g, value = grad_and_value(loss_fn)(fast)
        if start_loss is None:
            start_loss = value.detach()
        if first_order:
            g = {k: v.detach() for k, v in g.items()}
        fast = {k: fast[k] - sizes[k] * g[k] for k in fast}
    assert start_loss is not None  # steps >= 1 by construction
    return fast, start_loss


def eager_inner_sgd(
    losses_fn: LossFn, fast: Params, sizes: StepSizes, steps: int, *, first_order: bool = False
) -> tuple[Params, Tensor]:
    """:func:`inner_sgd` for ``T`` stacked tasks with eager autograd: ``losses_fn`` returns per-task losses ``[T]``.

    The gradient of their sum holds each task's own gradient in its row. Second order keeps the
    graph of every step (``create_graph=True``); ``first_order`` drops it after each step and
    returns detached parameters. Stacked Meta-SGD rates are ``[T, *shape]`` like the parameters;
    a float broadcasts.
    """
    start_loss = None
    for _ in range(steps):
        if first_order:
            fast = {k: v.detach().requires_grad_(True) for k, v in fast.items()}
        with torch.enable_grad():
            losses = losses_fn(fast)
            g = grad_dict(losses.sum(), fast, create_graph=not first_order)
        if start_loss is None:
            start_loss = losses.detach()
        with torch.set_grad_enabled(not first_order):
            fast = {k: fast[k] - sizes[k] * g[k] for k in fast}
    assert start_loss is not None  # steps >= 1 by construction
    return fast, start_loss


def metric_dict(
    kind: str,
    losses: Callable[[Tensor, Tensor], Tensor],
    accuracies: Callable[[Tensor, Tensor], Tensor],
    *,
    support_loss_pre: Tensor,
    support_loss_post: Tensor,
    query_pred_pre: Tensor,
    query_pred_post: Tensor,
    query_y: Tensor,
) -> dict[str, Tensor]:
    """The standard metrics (:data:`METRIC_NAMES`, plus query accuracies for classification), detached.

    ``losses`` and ``accuracies`` score predictions against targets: :func:`task_loss` /
    :func:`task_accuracy` for one task, :func:`task_losses` / :func:`task_accuracies` for stacked tasks.
    """
    out = {
        "support_loss_pre": support_loss_pre,
        "support_loss_post": support_loss_post,
        "query_loss_pre": losses(query_pred_pre, query_y),
        "query_loss_post": losses(query_pred_post, query_y),
    }
    if kind == "classification":
        out["query_accuracy_pre"] = accuracies(query_pred_pre, query_y)
        out["query_accuracy_post"] = accuracies(query_pred_post, query_y)
    return {k: v.detach() for k, v in out.items()}


@dataclass(frozen=True)
class MetaUpdate:
    """A (client's or round's) meta-update: the mean over its tasks, and how many tasks it covers."""

    gradient: Params
    num_tasks: int
    metrics: dict[str, float]


class MetaAlgorithm:
    """Base class: an inner loop on the support set, an outer objective on the query set.

    Args:
        model: the functional model whose parameters are meta-learned.
        kind: ``"regression"`` or ``"classification"`` (selects loss and metrics).
        inner_lr: step size of the inner loop (Meta-SGD: the initial value of its learned rates).
        inner_steps: gradient steps of the inner loop during meta-training.
    """

    name: ClassVar[str] = ""
    #: True when the outer gradient differentiates through the inner loop.
    second_order: ClassVar[bool] = False
    #: How the update follows from the objective (:data:`fedmeta.algorithms.engine.UPDATE_RULES`).
    update_rule: ClassVar[str] = "exact"
    #: What the inner loop changes, in words (``fedmeta adapt``'s report).
    adapts: ClassVar[str] = "all parameters"

    def __init__(self, model: FunctionalModel, *, kind: str, inner_lr: float, inner_steps: int) -> None:
        if kind not in ("regression", "classification"):
            raise ValueError(f"kind must be 'regression' or 'classification', got {kind!r}")
        if inner_lr <= 0:
            raise ValueError(f"inner_lr must be positive, got {inner_lr}")
        if inner_steps < 1:
            raise ValueError(f"inner_steps must be at least 1, got {inner_steps}")
        self.model = model
        self.kind = kind
        self.inner_lr = inner_lr
        self.inner_steps = inner_steps
        #: batch-level objective terms added to the outer objective (:meth:`with_terms`)
        self.terms: tuple[ObjectiveTerm, ...] = ()

    # -- options (the one place each algorithm's option rules live; config validation calls it) --

    @classmethod
    def check_options(cls, *, kind: str | None, head_init: str, task: str | None = None) -> None:
        """Refuse options this algorithm cannot use: by default ``meta.head_init`` must be ``learned``.

        Args:
            kind: the task kind (``None`` where it is not known yet, e.g. a folder site at config time).
            head_init: ``meta.head_init``.
            task: ``task.name``, for messages.

        Raises:
            ConfigError: naming the key and the bad value.
        """
        if head_init != "learned":
            raise ConfigError(
                "config key 'meta.head_init' must be 'learned' unless meta.algorithm is 'anil' (only meta.algorithm "
                "'anil' "
                f"takes another; {cls.name!r} adapts {cls.adapts}), got {head_init!r}"
            )

    @classmethod
    def build(
        cls, model: FunctionalModel, *, kind: str, inner_lr: float, inner_steps: int, head_init: str = "learned"
    ) -> MetaAlgorithm:
        """The algorithm for ``model`` with the config's options, checked by :meth:`check_options` first.

        Raises:
            ConfigError: for options this algorithm or the task kind cannot use.
        """
        cls.check_options(kind=kind, head_init=head_init)
        return cls(model, kind=kind, inner_lr=inner_lr, inner_steps=inner_steps)

    @classmethod
    def serves_any_ways(cls, *, head_init: str) -> bool:
        """Whether a checkpoint of this algorithm classifies any number of classes.

        True where its head is rebuilt per support set.
        """
        return False

    @property
    def rebuilds_head(self) -> bool:
        """True when adaptation rebuilds the head from the support set (so the stored head is unused)."""
        return False

    # -- parameters --------------------------------------------------------------------------

    def init_meta_params(self, gen: torch.Generator) -> Params:
        """Initial meta-parameters (the model's; Meta-SGD adds its learning rates)."""
        return self.model.init_params(gen)

    def start_head(self, head: Params, h: Tensor, y: Tensor) -> Params:
        """The head adaptation starts from, for support features ``h`` and labels ``y``: the stored one by default."""
        return head

    def adapted_keys(self, meta: Params) -> list[str]:
        """Names of the parameters the inner loop changes (all model parameters by default)."""
        return list(model_part(meta))

    def step_sizes(self, meta: Params) -> StepSizes:
        """Inner-loop step size per adapted parameter (a float, or a learned tensor for Meta-SGD)."""
        return dict.fromkeys(self.adapted_keys(meta), self.inner_lr)

    # -- the inner loop (one task; traceable by vmap and grad) -------------------------------

    def loss(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Task loss of ``params`` on examples ``(x, y)``."""
        return task_loss(self.kind, self.model.forward(model_part(params), x), y)

    def adapt(self, meta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool = False) -> Params:
        """Take ``steps`` gradient steps on ``(x, y)`` from ``meta`` and return the adapted parameters.

        Differentiable with respect to ``meta`` (and Meta-SGD's learning rates) unless
        ``first_order`` is set, in which case the inner gradients are treated as constants.
        The returned dict holds only model parameters.
        """
        return self.adapt_with_loss(meta, x, y, steps, first_order=first_order)[0]

    def adapt_with_loss(
        self, meta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool = False
    ) -> tuple[Params, Tensor]:
        """:meth:`adapt`, also returning the loss on ``(x, y)`` before the first step (for free)."""
        keys = self.adapted_keys(meta)
        sizes = self.step_sizes(meta)
        params = model_part(meta)
        fast = {k: params[k] for k in keys}
        frozen = {k: v for k, v in params.items() if k not in fast}

        def inner_loss(p: Params) -> Tensor:
            return self.loss({**frozen, **p}, x, y)

        fast, start_loss = inner_sgd(inner_loss, fast, sizes, steps, first_order=first_order)
        return {**frozen, **fast}, start_loss

    def adaptation_curve(
        self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int
    ) -> dict[str, Tensor]:
        """Query loss (and accuracy) after ``0..steps`` inner steps on the support set, one task.

        Used for evaluation: first-order only (nothing is differentiated afterwards).
        """
        keys = self.adapted_keys(meta)
        sizes = self.step_sizes(meta)
        params = {k: v.detach() for k, v in model_part(meta).items()}
        sizes = {k: (s.detach() if isinstance(s, Tensor) else s) for k, s in sizes.items()}
        fast = {k: params[k] for k in keys}
        frozen = {k: v for k, v in params.items() if k not in fast}

        def inner_loss(p: Params) -> Tensor:
            return self.loss({**frozen, **p}, sx, sy)

        losses, accs = [], []
        for step in range(steps + 1):
            pred = self.model.forward({**frozen, **fast}, qx)
            losses.append(task_loss(self.kind, pred, qy))
            if self.kind == "classification":
                accs.append(task_accuracy(pred, qy))
            if step < steps:
                g = grad(inner_loss)(fast)
                fast = {k: fast[k] - sizes[k] * g[k] for k in keys}
        out = {"query_loss": torch.stack(losses)}
        if accs:
            out["query_accuracy"] = torch.stack(accs)
        return out

    # -- the outer objective, declared once (fedmeta/algorithms/engine.py runs it) -------------

    def objective(
        self, ops: TaskOps, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        """The outer objective of the ``exact`` rule: the query loss after adaptation, and the state the metrics need.

        Written with ``ops`` (:class:`~fedmeta.algorithms.engine.TaskOps`), so the same code gives one
        task's loss or ``T`` stacked tasks' losses ``[T]``. The state holds at least ``adapted``
        (the adapted model parameters, for objective terms); :meth:`metrics` reads it.

        Raises:
            NotImplementedError: for an algorithm with another update rule.
        """
        raise NotImplementedError(
            f"{type(self).__name__} has update rule {self.update_rule!r}; only 'exact' has an objective"
        )

    def adapted_model(self, state: dict[str, Any]) -> Params:
        """The adapted model parameters of an :meth:`objective`'s state (what objective terms see)."""
        return state["adapted"]

    def adaptation_state(self, ops: TaskOps, meta: Params, sx: Tensor, sy: Tensor) -> dict[str, Any]:
        """The inner loop of the ``first_order``, ``reptile`` and ``pooled`` rules (first order), as a metrics state."""
        adapted, support_loss_pre = ops.adapt(meta, sx, sy, self.inner_steps, first_order=True)
        return {"adapted": adapted, "support_loss_pre": support_loss_pre}

    def metrics(
        self, ops: TaskOps, meta: Params, state: dict[str, Any], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> dict[str, Tensor]:
        """The standard metrics (:data:`METRIC_NAMES`, query accuracies for classification), detached.

        Values the objective computed (``support_loss_pre``, optionally ``query_pred_post``) come
        from ``state`` so that no forward pass runs twice.
        """
        adapted = state["adapted"]
        pred_post = state.get("query_pred_post")
        return metric_dict(
            self.kind,
            ops.loss,
            ops.accuracy,
            support_loss_pre=state["support_loss_pre"],
            support_loss_post=ops.losses_of(adapted, sx, sy),
            query_pred_pre=ops.forward(model_part(meta), qx),
            query_pred_post=ops.forward(model_part(adapted), qx) if pred_post is None else pred_post,
            query_y=qy,
        )

    def outer_loss(
        self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """One task's :meth:`objective` (``torch.func``-traceable) and its metrics."""
        ops = PerTaskOps(self)
        loss, state = self.objective(ops, meta, sx, sy, qx, qy)
        return loss, self.metrics(ops, meta, state, sx, sy, qx, qy)

    def task_update(
        self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Params, dict[str, Tensor]]:
        """Meta-gradient (or pseudo-gradient) of one task and its metrics.

        See :func:`fedmeta.algorithms.engine.task_update`.

        Returns:
            A dict with the same keys and shapes as ``meta``, and a dict of scalar metrics with at
            least :data:`METRIC_NAMES` (plus ``query_accuracy_pre/post`` for classification).
        """
        return engine.task_update(self, meta, sx, sy, qx, qy)

    def task_updates(self, meta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """Per-task meta-gradients for a batch of tasks, with no Python loop over tasks.

        Uses :meth:`batched_task_updates` when the model runs all tasks in one native pass
        (``model.batched_tasks``) and :meth:`vmapped_task_updates` otherwise; both return the same
        values (up to floating-point summation order). :attr:`terms` are added to the objective.

        Returns:
            ``({name: [T, *shape]}, {metric: [T]})``, detached.
        """
        return engine.task_updates(self, meta, tasks, self.terms)

    def vmapped_task_updates(self, meta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """:meth:`task_update` vectorized over tasks with ``vmap``."""
        return engine.vmapped_task_updates(self, meta, tasks, self.terms)

    def batched_task_updates(self, meta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """The same per-task updates as :meth:`vmapped_task_updates`, from one batched pass with eager autograd.

        Works with any model (the default batched model methods ``vmap`` the single-task ones);
        fast with a model whose ``forward_tasks`` is native.
        """
        return engine.batched_task_updates(self, meta, tasks, self.terms)

    def with_terms(self, *terms: ObjectiveTerm) -> MetaAlgorithm:
        """This algorithm with ``terms`` added to its outer objective (returns ``self``).

        Raises:
            ValueError: if the algorithm does not adapt (its update rule is ``pooled``: FedAvg).
        """
        if terms and self.update_rule not in ("exact", "first_order", "reptile"):
            raise ValueError(f"objective terms need an algorithm that adapts; {self.name!r} has {self.update_rule!r}")
        self.terms = (*self.terms, *terms)
        return self


    # -- the batched eager path: T tasks at once, parameters stacked [T, *shape] ---------------

    def losses_tasks(self, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Per-task losses ``[T]`` of stacked ``params`` on ``x`` ``[T, N, ...]``."""
        return task_losses(self.kind, self.model.forward_tasks(model_part(params), x), y)

    def adapt_tasks(
        self, meta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool = False
    ) -> tuple[Params, Tensor]:
        """:meth:`adapt_with_loss` for ``T`` tasks at once, on stacked parameters ``[T, *shape]``.

        Second order (the default) keeps the graph of every inner step (``create_graph=True``),
        so the result is differentiable with respect to ``meta`` (which must require grad, see
        :func:`stack_for_tasks`). With ``first_order`` each step's graph is dropped once its
        gradient is taken and the adapted parameters come back detached (what FOMAML, Reptile
        and evaluation use; the generic :meth:`adapt` keeps the identity path to ``meta``).

        Returns:
            The adapted parameters (model parameters only, stacked) and the per-task loss on
            ``(x, y)`` before the first step, ``[T]``, detached.
        """
        keys = self.adapted_keys(meta)
        sizes = self.step_sizes(meta)
        params = adaptation_start(meta, first_order=first_order)
        if first_order:
            sizes = {k: (s.detach() if isinstance(s, Tensor) else s) for k, s in sizes.items()}
        fast = {k: params[k] for k in keys}
        frozen = {k: v for k, v in params.items() if k not in fast}
        fast, start_loss = eager_inner_sgd(
            lambda p: self.losses_tasks({**frozen, **p}, x, y), fast, sizes, steps, first_order=first_order
        )
        return {**frozen, **fast}, start_loss

    def meta_gradient(self, meta: Params, tasks: TaskBatch) -> MetaUpdate:
        """The mean meta-gradient over ``tasks`` with mean metrics: what one client computes."""
        grads, metrics = self.task_updates(meta, tasks)
        return MetaUpdate(
            gradient={k: v.mean(dim=0) for k, v in grads.items()},
            num_tasks=tasks.num_tasks,
            metrics={k: float(v.mean()) for k, v in metrics.items()},
        )


def has_learned_rates(meta: Params) -> bool:
    """True if ``meta`` carries Meta-SGD learning rates."""
    return any(k.startswith(LR_PREFIX) for k in meta)


def learned_rates(meta: Params) -> Params:
    """Meta-SGD rates keyed by parameter name."""
    return lr_part(meta)


#: The algorithms by config name (``meta.algorithm``); each module registers its class.
ALGORITHMS: Registry[type[MetaAlgorithm]] = Registry("algorithm", key="meta.algorithm")
