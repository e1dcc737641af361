"""Plain federated averaging baseline (McMahan et al., 2017): no inner loop during training."""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor
from torch.func import grad

from fedmeta.algorithms.base import ALGORITHMS, MetaAlgorithm, grad_dict, stack_for_tasks
from fedmeta.types import Params, TaskBatch

__all__ = ["FedAvg"]


@ALGORITHMS.register("fedavg")
class FedAvg(MetaAlgorithm):
    """Train one model on all of a task's examples (support and query together).

    The "meta-gradient" is the ordinary gradient of the loss on the whole task at the current
    parameters, so federated training is FedSGD/FedAvg on the pooled data. At test time the
    model is fine-tuned on the support set like every other algorithm, which is what the FedMeta
    paper compares meta-learning against.
    """

    name: ClassVar[str] = "fedavg"

    def task_update(self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, dict[str, Tensor]]:
        x = torch.cat([sx, qx])
        y = torch.cat([sy, qy])
        g = grad(lambda p: self.loss(p, x, y))(meta)
        adapted, support_loss_pre = self.adapt_with_loss(meta, sx, sy, self.inner_steps, first_order=True)
        return g, self._metrics(meta, adapted, sx, sy, qx, qy, support_loss_pre=support_loss_pre)

    def batched_task_updates(self, meta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """All tasks' gradients on their pooled examples in one batched pass."""
        stacked = stack_for_tasks(meta, tasks.num_tasks)
        x = torch.cat([tasks.support_x, tasks.query_x], dim=1)
        y = torch.cat([tasks.support_y, tasks.query_y], dim=1)
        with torch.enable_grad():
            g = grad_dict(self.losses_tasks(stacked, x, y).sum(), stacked)
        adapted, support_loss_pre = self.adapt_tasks(stacked, tasks.support_x, tasks.support_y, self.inner_steps, first_order=True)
        metrics = self._metrics_tasks(stacked, adapted, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y, support_loss_pre=support_loss_pre)
        return g, metrics
