"""Reptile (Nichol, Achiam & Schulman, 2018): move the initialization toward adapted weights."""

from __future__ import annotations

from typing import ClassVar

from fedmeta.algorithms.base import ALGORITHMS, MetaAlgorithm

__all__ = ["Reptile"]


@ALGORITHMS.register("reptile")
class Reptile(MetaAlgorithm):
    """Reptile's pseudo-gradient ``θ - φ``, with ``φ`` the result of ``inner_steps`` SGD steps.

    The inner loop runs on the support set (the query set only measures the adapted model), so
    the update never sees query labels. A server SGD step with rate ``ε`` on the mean
    pseudo-gradient is exactly the batched Reptile update ``θ ← θ + ε · mean(φ_i − θ)``
    (the engine's ``reptile`` rule, fedmeta/algorithms/engine.py).
    """

    name: ClassVar[str] = "reptile"
    update_rule: ClassVar[str] = "reptile"
