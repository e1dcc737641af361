"""Reptile (Nichol, Achiam & Schulman, 2018): move the initialization toward adapted weights."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor

from fedmeta.algorithms.base import ALGORITHMS, MetaAlgorithm, stack_for_tasks
from fedmeta.types import Params, TaskBatch

__all__ = ["Reptile"]


@ALGORITHMS.register("reptile")
class Reptile(MetaAlgorithm):
    """Reptile's pseudo-gradient ``θ - φ``, with ``φ`` the result of ``inner_steps`` SGD steps.

    The inner loop runs on the support set (the query set only measures the adapted model), so
    the update never sees query labels. A server SGD step with rate ``ε`` on the mean
    pseudo-gradient is exactly the batched Reptile update ``θ ← θ + ε · mean(φ_i − θ)``.
    """

    name: ClassVar[str] = "reptile"

    def task_update(self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Params, dict[str, Tensor]]:
        adapted, support_loss_pre = self.adapt_with_loss(meta, sx, sy, self.inner_steps, first_order=True)
        adapted = {k: v.detach() for k, v in adapted.items()}
        return {k: meta[k] - adapted[k] for k in meta}, self._metrics(meta, adapted, sx, sy, qx, qy, support_loss_pre=support_loss_pre)

    def batched_task_updates(self, meta: Params, tasks: TaskBatch) -> tuple[Params, dict[str, Tensor]]:
        """All tasks' ``θ - φ`` from one graph-free batched inner loop."""
        stacked = stack_for_tasks(meta, tasks.num_tasks)
        adapted, support_loss_pre = self.adapt_tasks(stacked, tasks.support_x, tasks.support_y, self.inner_steps, first_order=True)
        metrics = self._metrics_tasks(stacked, adapted, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y, support_loss_pre=support_loss_pre)
        return {k: stacked[k].detach() - adapted[k] for k in meta}, metrics
