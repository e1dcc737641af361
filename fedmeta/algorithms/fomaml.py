"""First-order MAML (Finn et al., 2017, §5.2): the query gradient at the adapted parameters."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.func import grad

from fedmeta.algorithms.base import ALGORITHMS, MetaAlgorithm, grad_dict, stack_for_tasks, task_losses
from fedmeta.types import Params, TaskBatch

__all__ = ["FOMAML"]


@ALGORITHMS.register("fomaml")
class FOMAML(MetaAlgorithm):
    """MAML with the Jacobian of the inner loop dropped.

    The meta-gradient of one task is ``∇_φ L_query(φ)`` evaluated at the adapted parameters
    ``φ = U^k(θ; support)``: no second derivatives, memory independent of ``inner_steps``.
    """

    name: ClassVar[str] = "fomaml"

    def task_update(self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, dict[str, Tensor]]:
        adapted, support_loss_pre = self.adapt_with_loss(meta, sx, sy, self.inner_steps, first_order=True)
        adapted = {k: v.detach() for k, v in adapted.items()}
        g = grad(lambda p: self.loss(p, qx, qy))(adapted)
        return {k: g[k] for k in meta}, self._metrics(meta, adapted, sx, sy, qx, qy, support_loss_pre=support_loss_pre)

    def batched_task_updates(self, meta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """All tasks at once: a graph-free batched inner loop, then the query gradients at the adapted parameters."""
        stacked = stack_for_tasks(meta, tasks.num_tasks)
        adapted, support_loss_pre = self.adapt_tasks(stacked, tasks.support_x, tasks.support_y, self.inner_steps, first_order=True)
        leaves = {k: v.detach().requires_grad_(True) for k, v in adapted.items()}
        with torch.enable_grad():
            pred = self.model.forward_tasks(leaves, tasks.query_x)
            g = grad_dict(task_losses(self.kind, pred, tasks.query_y).sum(), leaves)
        metrics = self._metrics_tasks(
            stacked, adapted, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y,
            support_loss_pre=support_loss_pre, query_pred_post=pred.detach(),
        )
        return {k: g[k] for k in meta}, metrics
