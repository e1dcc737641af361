"""``federation.aggregation: mean``: the weighted mean of the client updates (FedAvg's rule)."""

from __future__ import annotations

import torch

from fedmeta.aggregation.base import AGGREGATORS, Aggregator, normalized_weights, weighted_sum
from fedmeta.types import Params

__all__ = ["WeightedMean"]


@AGGREGATORS.register("mean")
class WeightedMean(Aggregator):
    """``sum_c w_c u_c / sum_c w_c``, the weights normalized in float64 (McMahan et al., 2017).

    The only rule whose sensitivity the central-DP noise is calibrated to (config refuses the others
    under ``privacy.mode: client-central``).
    """

    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """The weighted mean of ``updates`` (``{key: [C, *shape]}``) with ``weights`` (``[C]``).

        Raises:
            ValueError: if the weights sum to zero.
        """
        return weighted_sum(updates, normalized_weights(weights))
