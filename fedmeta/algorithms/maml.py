"""MAML (Finn, Abbeel & Levine, 2017): exact second-order meta-gradient through the inner loop."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.func import grad

from fedmeta.algorithms.base import ALGORITHMS, MetaAlgorithm, grad_dict, stack_for_tasks, task_loss, task_losses
from fedmeta.types import Params, TaskBatch

__all__ = ["MAML"]


@ALGORITHMS.register("maml")
class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning.

    The meta-gradient of one task is ``d/dθ L_query(U^k(θ; support))`` where ``U^k`` is ``k``
    steps of gradient descent with step size ``inner_lr``; it is computed exactly (second
    order) with nested ``torch.func.grad``. Subclasses change what adapts (ANIL) or how big the
    steps are (Meta-SGD) and inherit the exact meta-gradient.
    """

    name: ClassVar[str] = "maml"
    second_order: ClassVar[bool] = True

    def outer_loss(self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        """Query loss after adapting on the support set, with the task's metrics as aux output."""
        adapted, support_loss_pre = self.adapt_with_loss(meta, sx, sy, self.inner_steps)
        pred = self.model.forward(adapted, qx)
        query_loss = task_loss(self.kind, pred, qy)
        metrics = self._metrics(
            meta, adapted, sx, sy, qx, qy, support_loss_pre=support_loss_pre, query_pred_post=pred.detach()
        )
        return query_loss, metrics

    def task_update(self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, dict[str, Tensor]]:
        grads, metrics = grad(self.outer_loss, has_aux=True)(meta, sx, sy, qx, qy)
        return grads, metrics

    def batched_task_updates(self, meta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """Exact second-order meta-gradients of all tasks: one batched inner loop built with
        ``create_graph=True``, then one backward pass from the summed query losses to the per-task
        copies of ``meta`` (Meta-SGD's rates included)."""
        stacked = stack_for_tasks(meta, tasks.num_tasks)
        with torch.enable_grad():
            adapted, support_loss_pre = self.adapt_tasks(stacked, tasks.support_x, tasks.support_y, self.inner_steps)
            pred = self.model.forward_tasks(adapted, tasks.query_x)
            grads = grad_dict(task_losses(self.kind, pred, tasks.query_y).sum(), stacked)
        metrics = self._metrics_tasks(
            stacked, adapted, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y,
            support_loss_pre=support_loss_pre, query_pred_post=pred.detach(),
        )
        return grads, metrics
