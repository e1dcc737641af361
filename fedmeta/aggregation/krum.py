"""``federation.aggregation: krum`` and ``multikrum``: select the updates closest to their neighbours.

Blanchard, El Mhamdi, Guerraoui & Stainer (NeurIPS 2017), "Machine Learning with Adversaries:
Byzantine Tolerant Gradient Descent". Each of the ``n`` updates is scored by the sum of its squared
distances to its ``n - f - 2`` nearest other updates, where ``f`` is the number of hostile clients
the rule is meant to withstand; Krum returns the update of lowest score, multi-Krum the weighted
mean of the ``m`` lowest.

Options: ``federation.krum_f`` (``f``, at least 0; the cohort must satisfy ``n > 2 f + 2``, checked
on ``federation.clients_per_round``) and ``federation.multikrum_m`` (``m`` for ``multikrum``;
null: ``n - f``). A round with fewer replies than ``clients_per_round`` may break ``n > 2 f + 2``:
the score then uses at least one neighbour (logged), and ``m`` is at most ``n``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from fedmeta.aggregation.base import AGGREGATORS, Aggregator, flat_updates, normalized_weights, weighted_sum
from fedmeta.registry import require
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = ["Krum", "MultiKrum", "krum_scores"]

log = logging.getLogger(__name__)

#: The rules of this module, by name (their options are checked when one of them is selected).
KRUM_RULES = ("krum", "multikrum")


def krum_scores(updates: Params, f: int) -> torch.Tensor:
    """Each update's Krum score: the sum of squared distances to its ``n - f - 2`` nearest others.

    Args:
        updates: ``{key: [n, *shape]}``.
        f: the number of hostile updates tolerated.

    Returns:
        ``[n]`` float64 scores (lower: more central). With ``n - f - 2 < 1`` one neighbour is used;
        a single update scores 0.
    """
    flat = flat_updates(updates)
    n = flat.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.float64)
    neighbours = n - f - 2
    if neighbours < 1:
        log.warning("krum: %d updates cannot tolerate federation.krum_f=%d (needs n > 2f + 2); using 1 neighbour", n, f)
        neighbours = 1
    dist = torch.cdist(flat, flat).pow(2)
    dist.fill_diagonal_(float("inf"))
    return dist.topk(neighbours, dim=1, largest=False).values.sum(dim=1)


def _check_f(cfg: Config, rule: str) -> None:
    f = cfg.federation
    require(f.krum_f >= 0, "federation.krum_f", f.krum_f, "must be a non-negative integer")
    if f.aggregation == rule:
        require(
            f.clients_per_round > 2 * f.krum_f + 2,
            "federation.krum_f",
            f.krum_f,
            f"must satisfy federation.clients_per_round ({f.clients_per_round}) > 2 * krum_f + 2 for "
            f"federation.aggregation '{rule}' (Blanchard et al., 2017)",
        )


@AGGREGATORS.register("krum")
class Krum(Aggregator):
    """The single update of lowest Krum score (:func:`krum_scores`); the weights are not used.

    Args:
        f: the number of hostile clients tolerated (``federation.krum_f``).

    Raises:
        ConfigError: naming ``federation.krum_f`` if ``f`` is negative.
    """

    def __init__(self, f: int = 1) -> None:
        require(f >= 0, "federation.krum_f", f, "must be a non-negative integer")
        self.f = int(f)

    @classmethod
    def from_config(cls, cfg: Config) -> Krum:
        """From ``federation.krum_f``."""
        return cls(cfg.federation.krum_f)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``federation.krum_f >= 0``; with ``krum`` selected, ``clients_per_round > 2 krum_f + 2``."""
        _check_f(cfg, "krum")

    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """The most central update of ``updates`` (``{key: [n, *shape]}``)."""
        best = int(torch.argmin(krum_scores(updates, self.f)))
        return {k: v[best].clone() for k, v in updates.items()}


@AGGREGATORS.register("multikrum")
class MultiKrum(Aggregator):
    """The weighted mean of the ``m`` updates of lowest Krum score (Blanchard et al., 2017).

    Args:
        f: the number of hostile clients tolerated (``federation.krum_f``).
        m: how many updates are kept (``federation.multikrum_m``; ``None``: ``n - f``).

    Raises:
        ConfigError: naming the key if ``f`` is negative or ``m`` is below 1.
    """

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        require(f >= 0, "federation.krum_f", f, "must be a non-negative integer")
        require(m is None or m >= 1, "federation.multikrum_m", m, "must be null or at least 1")
        self.f = int(f)
        self.m = m

    @classmethod
    def from_config(cls, cfg: Config) -> MultiKrum:
        """From ``federation.krum_f`` and ``federation.multikrum_m``."""
        return cls(cfg.federation.krum_f, cfg.federation.multikrum_m)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``krum_f`` as for ``krum``; ``multikrum_m`` null or in ``1 .. clients_per_round``."""
        _check_f(cfg, "multikrum")
        f = cfg.federation
        require(
            f.multikrum_m is None or 1 <= f.multikrum_m <= f.clients_per_round,
            "federation.multikrum_m",
            f.multikrum_m,
            f"must be null or between 1 and federation.clients_per_round ({f.clients_per_round})",
        )

    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """The weighted mean of the ``m`` most central updates.

        Raises:
            ValueError: if the kept updates' weights sum to zero.
        """
        scores = krum_scores(updates, self.f)
        n = scores.shape[0]
        m = max(1, min(n, self.m if self.m is not None else n - self.f))
        keep = torch.argsort(scores, stable=True)[:m]
        w = normalized_weights(weights[keep], whose=" of the updates multi-Krum keeps")
        return weighted_sum({k: v[keep] for k, v in updates.items()}, w)
