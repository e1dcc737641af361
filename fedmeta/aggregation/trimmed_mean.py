"""``federation.aggregation: trimmed_mean``: the coordinate-wise trimmed mean of the client updates.

Option: ``federation.trim_fraction`` (in ``[0, 0.5)``), the share of clients dropped at each end.

Note on small cohorts: the number dropped at each end is ``floor(trim_fraction * C)`` for a cohort
of ``C`` updates, so with the default 0.1 a cohort of fewer than 10 clients drops nothing and the
rule is the plain (unweighted) mean — no robustness at all. This is today's behaviour, kept as it
is; changing it moves numbers and belongs to its own change.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from fedmeta.aggregation.base import AGGREGATORS, Aggregator
from fedmeta.registry import require
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = ["TrimmedMean"]


def _check_trim_fraction(trim_fraction: float) -> None:
    require(0 <= trim_fraction < 0.5, "federation.trim_fraction", trim_fraction, "must be in [0, 0.5)")


@AGGREGATORS.register("trimmed_mean")
class TrimmedMean(Aggregator):
    """Each coordinate's mean after dropping its ``floor(trim_fraction * C)`` largest and smallest
    values over the ``C`` clients (Yin et al., 2018); the weights are not used.

    Args:
        trim_fraction: share dropped at each end, in ``[0, 0.5)``.

    Raises:
        ConfigError: naming ``federation.trim_fraction`` if it is out of range.
    """

    def __init__(self, trim_fraction: float = 0.1) -> None:
        _check_trim_fraction(trim_fraction)
        self.trim_fraction = trim_fraction

    @classmethod
    def from_config(cls, cfg: Config) -> TrimmedMean:
        """From ``federation.trim_fraction``."""
        return cls(cfg.federation.trim_fraction)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``federation.trim_fraction`` must be in ``[0, 0.5)`` (checked whichever rule is selected)."""
        _check_trim_fraction(cfg.federation.trim_fraction)

    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """The coordinate-wise trimmed mean of ``updates`` (``{key: [C, *shape]}``)."""
        out: Params = {}
        for k, v in updates.items():
            c = v.shape[0]
            cut = int(math.floor(self.trim_fraction * c))
            srt = v.sort(dim=0).values
            out[k] = srt[cut : c - cut].mean(dim=0)
        return out
