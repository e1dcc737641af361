"""What every meta-learning algorithm shares: losses, the functional inner loop, batching over tasks.

An algorithm is one class with one signature. :meth:`MetaAlgorithm.task_update` takes the
meta-parameters and *one* task and returns that task's meta-gradient (or, for Reptile and FedAvg,
the pseudo-gradient the server optimizer treats the same way) plus per-task metrics.
:meth:`MetaAlgorithm.task_updates` batches it over tasks with ``torch.func.vmap``, so no Python
loop over tasks runs on the hot path. Nothing here mutates the meta-parameters.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad, grad_and_value, vmap

from fedmeta.models.base import FunctionalModel
from fedmeta.types import LR_PREFIX, Params, TaskBatch, lr_part, model_part

__all__ = ["MetaAlgorithm", "MetaUpdate", "task_loss", "task_accuracy", "METRIC_NAMES"]

#: Per-task metrics every algorithm reports (means over a client's tasks leave the client).
METRIC_NAMES = ("support_loss_pre", "support_loss_post", "query_loss_pre", "query_loss_post")


def task_loss(kind: str, pred: Tensor, y: Tensor) -> Tensor:
    """Mean squared error (regression) or cross-entropy (classification) over one task's examples."""
    if kind == "classification":
        return F.cross_entropy(pred, y)
    return F.mse_loss(pred, y)


def task_accuracy(pred: Tensor, y: Tensor) -> Tensor:
    """Fraction of correct argmax predictions."""
    return (pred.argmax(dim=-1) == y).float().mean()


@dataclass(frozen=True)
class MetaUpdate:
    """A (client's or round's) meta-update: the mean over its tasks, and how many tasks it covers."""

    gradient: Params
    num_tasks: int
    metrics: dict[str, float]


class MetaAlgorithm(ABC):
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

    # -- parameters --------------------------------------------------------------------------

    def init_meta_params(self, gen: torch.Generator) -> Params:
        """Initial meta-parameters (the model's; Meta-SGD adds its learning rates)."""
        return self.model.init_params(gen)

    def adapted_keys(self, meta: Params) -> list[str]:
        """Names of the parameters the inner loop changes (all model parameters by default)."""
        return list(model_part(meta))

    def step_sizes(self, meta: Params) -> dict[str, Tensor | float]:
        """Inner-loop step size per adapted parameter (a float, or a learned tensor for Meta-SGD)."""
        return {k: self.inner_lr for k in self.adapted_keys(meta)}

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

    def adapt_with_loss(self, meta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool = False) -> tuple[Params, Tensor]:
        """:meth:`adapt`, also returning the loss on ``(x, y)`` before the first step (for free)."""
        keys = self.adapted_keys(meta)
        sizes = self.step_sizes(meta)
        params = model_part(meta)
        fast = {k: params[k] for k in keys}
        frozen = {k: v for k, v in params.items() if k not in fast}

        def inner_loss(p: Params) -> Tensor:
            return self.loss({**frozen, **p}, x, y)

        start_loss = None
        for _ in range(steps):
            g, value = grad_and_value(inner_loss)(fast)
            if start_loss is None:
                start_loss = value.detach()
            if first_order:
                g = {k: v.detach() for k, v in g.items()}
            fast = {k: fast[k] - sizes[k] * g[k] for k in keys}
        assert start_loss is not None  # steps >= 1 by construction
        return {**frozen, **fast}, start_loss

    def adaptation_curve(self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int) -> dict[str, Tensor]:
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

    # -- the outer objective -----------------------------------------------------------------

    @abstractmethod
    def task_update(self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, dict[str, Tensor]]:
        """Meta-gradient (or pseudo-gradient) of one task and its metrics.

        Returns:
            A dict with the same keys and shapes as ``meta``, and a dict of scalar metrics with at
            least :data:`METRIC_NAMES` (plus ``query_accuracy_pre/post`` for classification).
        """

    def _metrics(
        self,
        meta: Params,
        adapted: Params,
        sx: Tensor,
        sy: Tensor,
        qx: Tensor,
        qy: Tensor,
        *,
        support_loss_pre: Tensor | None = None,
        query_pred_post: Tensor | None = None,
    ) -> dict[str, Tensor]:
        """The standard per-task metrics, detached.

        Values the caller already computed (the support loss before the first inner step, the
        adapted model's query predictions) are passed in so that no forward pass runs twice.
        """
        pre_q = self.model.forward(model_part(meta), qx)
        post_q = self.model.forward(adapted, qx) if query_pred_post is None else query_pred_post
        out = {
            "support_loss_pre": self.loss(meta, sx, sy) if support_loss_pre is None else support_loss_pre,
            "support_loss_post": self.loss(adapted, sx, sy),
            "query_loss_pre": task_loss(self.kind, pre_q, qy),
            "query_loss_post": task_loss(self.kind, post_q, qy),
        }
        if self.kind == "classification":
            out["query_accuracy_pre"] = task_accuracy(pre_q, qy)
            out["query_accuracy_post"] = task_accuracy(post_q, qy)
        return {k: v.detach() for k, v in out.items()}

    def task_updates(self, meta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """Per-task meta-gradients for a batch of tasks, vectorized with ``vmap``.

        Returns:
            ``({name: [T, *shape]}, {metric: [T]})``.
        """
        fn: Callable[..., tuple[Params, dict[str, Tensor]]] = vmap(self.task_update, in_dims=(None, 0, 0, 0, 0))
        grads, metrics = fn(meta, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y)
        return {k: v.detach() for k, v in grads.items()}, {k: v.detach() for k, v in metrics.items()}

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
