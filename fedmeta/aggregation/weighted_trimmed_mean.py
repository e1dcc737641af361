"""``federation.aggregation: weighted_trimmed_mean``: the trimmed mean under the clients' weights.

Per coordinate the sorted values carry their clients' weights (task counts, bounded by the round
loop); the ``trim_fraction`` share of the total weight is removed from each end — a client at the
boundary loses only the part of its weight that lies beyond it — and the weighted mean of what is
left is returned. With equal weights and ``trim_fraction × C`` a whole number this is
``trimmed_mean``; otherwise the boundary clients count in part (e.g. 0.1 of 5 equal clients trims
half a client at each end), where ``trimmed_mean`` rounds to whole clients.

Option: ``federation.trim_fraction`` (in ``[0, 0.5)``), shared with ``trimmed_mean``.
"""

from __future__ import annotations

import torch

from fedmeta.aggregation.base import AGGREGATORS
from fedmeta.aggregation.trimmed_mean import TrimmedMean
from fedmeta.aggregation.weighted_median import _check_weights, sort_with_weights
from fedmeta.types import Params

__all__ = ["WeightedTrimmedMean"]


@AGGREGATORS.register("weighted_trimmed_mean")
class WeightedTrimmedMean(TrimmedMean):
    """Each coordinate's weighted mean after removing ``trim_fraction`` of the weight at each end.

    The option and its check are ``trimmed_mean``'s; only the rule differs.

    Args:
        trim_fraction: share of the total weight removed at each end, in ``[0, 0.5)``.

    Raises:
        ConfigError: naming ``federation.trim_fraction`` if it is out of range.
    """

    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """The weighted trimmed mean of ``updates`` (``{key: [C, *shape]}``) per coordinate.

        Raises:
            ValueError: if a weight is negative or they sum to zero.
        """
        total = _check_weights(weights)
        low, high = self.trim_fraction * total, (1 - self.trim_fraction) * total
        out: Params = {}
        for k, v in updates.items():
            srt, w = sort_with_weights(v, weights)
            upto = w.cumsum(dim=0)
            kept = (upto.clamp(max=high) - (upto - w).clamp(min=low)).clamp(min=0)
            out[k] = ((kept * srt.to(torch.float64)).sum(dim=0) / kept.sum(dim=0)).to(v.dtype)
        return out
