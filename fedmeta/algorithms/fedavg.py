"""Plain federated averaging baseline (McMahan et al., 2017): no inner loop during training."""

from __future__ import annotations

from typing import ClassVar

from fedmeta.algorithms.base import ALGORITHMS, MetaAlgorithm

__all__ = ["FedAvg"]


@ALGORITHMS.register("fedavg")
class FedAvg(MetaAlgorithm):
    """Train one model on all of a task's examples (support and query together).

    The "meta-gradient" is the ordinary gradient of the loss on the whole task at the current
    parameters (the engine's ``pooled`` rule, fedmeta/algorithms/engine.py), so federated
    training is FedSGD/FedAvg on the pooled data. At test time the model is fine-tuned on the
    support set like every other algorithm, which is what the FedMeta paper compares
    meta-learning against.
    """

    name: ClassVar[str] = "fedavg"
    update_rule: ClassVar[str] = "pooled"
