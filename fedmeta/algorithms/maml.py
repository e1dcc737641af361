"""MAML (Finn, Abbeel & Levine, 2017): exact second-order meta-gradient through the inner loop."""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor

from fedmeta.algorithms.base import ALGORITHMS, MetaAlgorithm
from fedmeta.algorithms.engine import TaskOps
from fedmeta.types import Params

__all__ = ["MAML"]


@ALGORITHMS.register("maml")
class MAML(MetaAlgorithm):
    """Model-Agnostic Meta-Learning.

    The meta-gradient of one task is ``d/dθ L_query(U^k(θ; support))`` where ``U^k`` is ``k``
    steps of gradient descent with step size ``inner_lr``; it is computed exactly (second
    order): nested ``torch.func.grad`` per task, or eager autograd through a batched inner loop
    built with ``create_graph=True`` (fedmeta/algorithms/engine.py). Subclasses change what adapts
    (ANIL) or how big the steps are (Meta-SGD) and inherit the exact meta-gradient.
    """

    name: ClassVar[str] = "maml"
    second_order: ClassVar[bool] = True
    update_rule: ClassVar[str] = "exact"

    def objective(
        self, ops: TaskOps, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        """Query loss after adapting on the support set (differentiable through the inner loop)."""
        adapted, support_loss_pre = ops.adapt(meta, sx, sy, self.inner_steps)
        pred = ops.forward(adapted, qx)
        return ops.loss(pred, qy), {
            "adapted": adapted,
            "support_loss_pre": support_loss_pre,
            "query_pred_post": pred.detach(),
        }
