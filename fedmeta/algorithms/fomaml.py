"""First-order MAML (Finn et al., 2017, §5.2): the query gradient at the adapted parameters."""

from __future__ import annotations

from typing import ClassVar

from fedmeta.algorithms.base import ALGORITHMS, MetaAlgorithm

__all__ = ["FOMAML"]


@ALGORITHMS.register("fomaml")
class FOMAML(MetaAlgorithm):
    """MAML with the Jacobian of the inner loop dropped.

    The meta-gradient of one task is ``∇_φ L_query(φ)`` evaluated at the adapted parameters
    ``φ = U^k(θ; support)``: no second derivatives, memory independent of ``inner_steps``
    (the engine's ``first_order`` rule, fedmeta/algorithms/engine.py).
    """

    name: ClassVar[str] = "fomaml"
    update_rule: ClassVar[str] = "first_order"
