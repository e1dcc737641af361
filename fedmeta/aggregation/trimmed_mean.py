"""``federation.aggregation: trimmed_mean``: the coordinate-wise trimmed mean of the client updates.

Option: ``federation.trim_fraction`` (in ``[0, 0.5)``), the share of clients dropped at each end.

How many values are dropped at each end of a cohort of ``C`` updates (:func:`trim_count`):
``floor(trim_fraction * C)``, but at least one when ``trim_fraction > 0`` and the cohort keeps a
value after dropping one at each end (``C >= 3``). Flooring alone dropped nothing for cohorts under
``1 / trim_fraction`` clients (under 10 with the default 0.1), which made the rule the plain mean,
with no robustness at all.
"""

from __future__ import annotations

import math

import torch

from fedmeta.aggregation.base import AGGREGATORS, OptionRule
from fedmeta.registry import require
from fedmeta.types import Params

__all__ = ["TrimmedMean", "trim_count"]


def trim_count(trim_fraction: float, cohort: int) -> int:
    """Values dropped at each end of each coordinate for a cohort of ``cohort`` updates.

    ``floor(trim_fraction * cohort)``, raised to 1 when ``trim_fraction > 0`` (a positive fraction
    always trims), and never so many that nothing is left (at most ``(cohort - 1) // 2``).

    Args:
        trim_fraction: share dropped at each end, in ``[0, 0.5)``.
        cohort: the number of updates ``C``.

    Returns:
        The count dropped at each end (0 for ``trim_fraction == 0`` or ``cohort < 3``).
    """
    cut = int(math.floor(trim_fraction * cohort))
    if trim_fraction > 0:
        cut = max(cut, 1)
    return max(0, min(cut, (cohort - 1) // 2))


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(OptionRule):
    """Each coordinate's mean after dropping its :func:`trim_count` largest and smallest values over
    the ``C`` clients (Yin et al., 2018); the weights are not used (see ``weighted_trimmed_mean``).

    Args:
        trim_fraction: share dropped at each end, in ``[0, 0.5)``.

    Raises:
        ConfigError: naming ``federation.trim_fraction`` if it is out of range.
    """

    option = "trim_fraction"

    def __init__(self, trim_fraction: float = 0.1) -> None:
        super().__init__(trim_fraction)
        self.trim_fraction = trim_fraction

    @classmethod
    def check_option(cls, value: float) -> None:
        """``federation.trim_fraction`` must be in ``[0, 0.5)``."""
        require(0 <= value < 0.5, "federation.trim_fraction", value, "must be in [0, 0.5)")

    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """The coordinate-wise trimmed mean of ``updates`` (``{key: [C, *shape]}``)."""
        out: Params = {}
        for k, v in updates.items():
            c = v.shape[0]
            cut = trim_count(self.trim_fraction, c)
            srt = v.sort(dim=0).values
            out[k] = srt[cut : c - cut].mean(dim=0)
        return out
