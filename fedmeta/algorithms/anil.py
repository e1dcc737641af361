"""ANIL (Raghu, Raghu, Bengio & Vinyals, 2020): adapt only the head in the inner loop."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor
from torch.func import grad

from fedmeta.algorithms.base import task_accuracy, task_loss
from fedmeta.algorithms.maml import MAML
from fedmeta.types import Params, model_part

__all__ = ["ANIL"]


class ANIL(MAML):
    """Almost No Inner Loop: the body is meta-learned, only the head adapts per task.

    Features of the support and query sets are computed once per task (the body does not change
    in the inner loop); the outer gradient reaches the body through them, exactly (second order
    through the head's inner steps).
    """

    name: ClassVar[str] = "anil"

    def adapted_keys(self, meta: Params) -> list[str]:
        return self.model.head_keys()

    def _head_adapt(self, head: Params, hs: Tensor, sy: Tensor, steps: int) -> Params:
        def inner(p: Params) -> Tensor:
            return task_loss(self.kind, self.model.head(p, hs), sy)

        for _ in range(steps):
            g = grad(inner)(head)
            head = {k: head[k] - self.inner_lr * g[k] for k in head}
        return head

    def outer_loss(self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        params = model_part(meta)
        hs = self.model.features(params, sx)
        hq = self.model.features(params, qx)
        head0 = {k: params[k] for k in self.model.head_keys()}
        head = self._head_adapt(head0, hs, sy, self.inner_steps)
        pred_q = self.model.head(head, hq)
        query_loss = task_loss(self.kind, pred_q, qy)
        pre_q = self.model.head(head0, hq)
        metrics = {
            "support_loss_pre": task_loss(self.kind, self.model.head(head0, hs), sy),
            "support_loss_post": task_loss(self.kind, self.model.head(head, hs), sy),
            "query_loss_pre": task_loss(self.kind, pre_q, qy),
            "query_loss_post": query_loss,
        }
        if self.kind == "classification":
            metrics["query_accuracy_pre"] = task_accuracy(pre_q, qy)
            metrics["query_accuracy_post"] = task_accuracy(pred_q, qy)
        return query_loss, {k: v.detach() for k, v in metrics.items()}
