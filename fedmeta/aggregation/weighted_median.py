"""``federation.aggregation: weighted_median``: each coordinate's median under the clients' weights.

Where ``median`` counts every client once, this rule gives each client its weight (its task count,
bounded by the round loop at ``meta.tasks_per_client × meta.local_steps``): per coordinate, the
value at which the sorted values' cumulative weight reaches half the total. When the cumulative
weight equals exactly half at a value (equal weights and an even cohort), the mean of that value
and the next is taken, so that with equal weights the rule is ``median``.
"""

from __future__ import annotations

import torch

from fedmeta.aggregation.base import AGGREGATORS, Aggregator
from fedmeta.types import Params

__all__ = ["WeightedMedian", "sort_with_weights"]

#: Relative tolerance when comparing cumulative weights with half the total (float64 sums).
_TOLERANCE = 1e-12


def sort_with_weights(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort ``values`` (``[C, *shape]``) along the clients, carrying each client's weight along.

    Args:
        values: one row per client.
        weights: ``[C]`` non-negative weights.

    Returns:
        The sorted values and the weights in the same order, both ``[C, *shape]`` (weights float64).
    """
    srt, idx = values.sort(dim=0, stable=True)
    w = weights.to(torch.float64).view(-1, *([1] * (values.dim() - 1))).expand(values.shape)
    return srt, torch.gather(w, 0, idx)


def _check_weights(weights: torch.Tensor) -> float:
    total = float(weights.to(torch.float64).sum())
    if total <= 0 or bool((weights < 0).any()):
        raise ValueError("aggregation weights must be non-negative and not sum to zero")
    return total


@AGGREGATORS.register("weighted_median")
class WeightedMedian(Aggregator):
    """The coordinate-wise weighted median of the client updates (no options).

    Bounds the influence of hostile clients holding less than half of the round's weight.
    """

    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """The weighted median of ``updates`` (``{key: [C, *shape]}``) per coordinate.

        Raises:
            ValueError: if a weight is negative or they sum to zero.
        """
        total = _check_weights(weights)
        half = total / 2
        out: Params = {}
        for k, v in updates.items():
            srt, w = sort_with_weights(v, weights)
            cum = w.cumsum(dim=0)
            tol = _TOLERANCE * total
            # first value whose cumulative weight reaches half, and first that passes it
            lower = (cum < half - tol).sum(dim=0, keepdim=True).clamp_max(v.shape[0] - 1)
            upper = (cum <= half + tol).sum(dim=0, keepdim=True).clamp_max(v.shape[0] - 1)
            lo, hi = srt.gather(0, lower).squeeze(0), srt.gather(0, upper).squeeze(0)
            out[k] = (lo + hi) / 2
        return out
