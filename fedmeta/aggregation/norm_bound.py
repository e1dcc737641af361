"""``federation.aggregation: norm_bound``: clip every update to a norm bound, then the weighted mean.

Sun, Kairouz, Suresh & McMahan (2019), "Can You Really Backdoor Federated Learning?": bounding each
update's L2 norm limits how far one client can move the mean (at most ``bound × w_c / sum w``),
whatever it sends. Option ``federation.norm_bound``: the bound (a positive number), or null for the
median of the round's update norms, which needs no tuning and adapts as updates shrink during
training (a minority of hostile clients cannot move the median far).

Under ``privacy.mode: client-central`` the server's clipping already bounds every update; that mode
accepts only ``mean`` (``docs/privacy.md``).
"""

from __future__ import annotations

import math

import torch

from fedmeta.aggregation.base import AGGREGATORS, OptionRule, flat_updates, normalized_weights, weighted_sum
from fedmeta.registry import require
from fedmeta.types import Params

__all__ = ["NormBoundedMean", "update_norms"]


def update_norms(updates: Params) -> torch.Tensor:
    """``[C]`` float64 L2 norms of the stacked updates ``{key: [C, *shape]}`` (all keys together)."""
    return flat_updates(updates).pow(2).sum(dim=1).sqrt()


@AGGREGATORS.register("norm_bound")
class NormBoundedMean(OptionRule):
    """``sum_c w_c clip(u_c, B) / sum_c w_c`` with ``clip(u, B) = u min(1, B / ||u||)``.

    Args:
        bound: ``B`` (``federation.norm_bound``); ``None``: the median of the round's update norms
            (for an even cohort the lower of the two middle norms, ``torch.median``'s convention).

    Raises:
        ConfigError: naming ``federation.norm_bound`` if it is not null or a positive number.
    """

    option = "norm_bound"

    def __init__(self, bound: float | None = None) -> None:
        super().__init__(bound)
        self.bound = bound

    @classmethod
    def check_option(cls, value: float | None) -> None:
        """``federation.norm_bound`` null or a positive number."""
        require(
            value is None or (value > 0 and math.isfinite(value)),
            "federation.norm_bound",
            value,
            "must be null (the median update norm) or a positive number",
        )

    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """The weighted mean of the norm-bounded ``updates``.

        Raises:
            ValueError: if the weights sum to zero.
        """
        w = normalized_weights(weights)
        norms = update_norms(updates)
        bound = float(norms.median()) if self.bound is None else float(self.bound)
        scale = torch.where(norms > bound, bound / norms.clamp_min(1e-300), torch.ones_like(norms))
        return weighted_sum(updates, w * scale)
