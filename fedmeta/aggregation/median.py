"""``federation.aggregation: median``: the coordinate-wise median of the client updates."""

from __future__ import annotations

import torch

from fedmeta.aggregation.base import AGGREGATORS, Aggregator
from fedmeta.types import Params

__all__ = ["CoordinateMedian"]


@AGGREGATORS.register("median")
class CoordinateMedian(Aggregator):
    """Each coordinate's median over the clients (Yin et al., 2018); the weights are not used.

    Bounds the influence of a minority of arbitrary updates. With an even number of clients the
    median is the mean of the two middle values (``torch.quantile(0.5)``), with an odd number the
    middle value itself.
    """

    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """The coordinate-wise median of ``updates`` (``{key: [C, *shape]}``)."""
        return {k: v.median(dim=0).values if v.shape[0] % 2 else v.quantile(0.5, dim=0) for k, v in updates.items()}
