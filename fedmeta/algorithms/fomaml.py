"""First-order MAML (Finn et al., 2017, §5.2): the query gradient at the adapted parameters."""

from __future__ import annotations

from typing import ClassVar

from torch import Tensor
from torch.func import grad

from fedmeta.algorithms.base import MetaAlgorithm
from fedmeta.types import Params

__all__ = ["FOMAML"]


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
