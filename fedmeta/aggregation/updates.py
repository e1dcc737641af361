"""Validating and combining client meta-updates: weighted mean and robust alternatives."""

from __future__ import annotations

import math

import torch

from fedmeta.errors import UpdateRejected
from fedmeta.types import Params

__all__ = ["validate_update", "aggregate", "stack", "AGGREGATORS", "global_norm"]

AGGREGATORS = ("mean", "median", "trimmed_mean")


def global_norm(update: Params) -> float:
    """L2 norm of all tensors of ``update`` taken together."""
    return math.sqrt(sum(float(v.double().pow(2).sum()) for v in update.values()))


def validate_update(update: Params, reference: Params, *, source: str = "client") -> None:
    """Check that ``update`` has exactly the keys and shapes of ``reference`` and finite values.

    Raises:
        UpdateRejected: naming ``source`` and the first offending key.
    """
    missing = sorted(set(reference) - set(update))
    extra = sorted(set(update) - set(reference))
    if missing or extra:
        raise UpdateRejected(f"update from {source} has missing keys {missing} and unexpected keys {extra}")
    for key, ref in reference.items():
        val = update[key]
        if tuple(val.shape) != tuple(ref.shape):
            raise UpdateRejected(
                f"update from {source}: '{key}' has shape {tuple(val.shape)}, expected {tuple(ref.shape)}"
            )
        if not val.is_floating_point():
            raise UpdateRejected(f"update from {source}: '{key}' has dtype {val.dtype}, expected a float tensor")
        if not bool(torch.isfinite(val).all()):
            raise UpdateRejected(f"update from {source}: '{key}' contains NaN or Inf")


def stack(updates: list[Params]) -> Params:
    """Stack a list of updates into ``{key: [C, *shape]}``."""
    if not updates:
        raise ValueError("no updates to stack")
    return {k: torch.stack([u[k] for u in updates]) for k in updates[0]}


def aggregate(stacked: Params, weights: torch.Tensor, *, method: str = "mean", trim_fraction: float = 0.1) -> Params:
    """Combine ``C`` stacked client updates into one.

    Args:
        stacked: ``{key: [C, *shape]}``.
        weights: ``[C]`` non-negative weights (number of tasks per client) for ``mean``.
        method: ``"mean"`` (weighted mean), ``"median"`` (coordinate-wise median; bounds the
            influence of a minority of arbitrary updates) or ``"trimmed_mean"`` (coordinate-wise,
            dropping the ``trim_fraction`` largest and smallest values; Yin et al., 2018).
        trim_fraction: share trimmed at each end for ``trimmed_mean``.

    Returns:
        ``{key: [*shape]}``.
    """
    if method == "mean":
        w = weights.to(torch.float64)
        if float(w.sum()) <= 0:
            raise ValueError("aggregation weights sum to zero")
        w = w / w.sum()
        return {k: torch.tensordot(w.to(v.dtype), v, dims=1) for k, v in stacked.items()}
    if method == "median":
        return {k: v.median(dim=0).values if v.shape[0] % 2 else v.quantile(0.5, dim=0) for k, v in stacked.items()}
    if method == "trimmed_mean":
        out: Params = {}
        for k, v in stacked.items():
            c = v.shape[0]
            cut = int(math.floor(trim_fraction * c))
            srt = v.sort(dim=0).values
            out[k] = srt[cut : c - cut].mean(dim=0)
        return out
    raise ValueError(f"aggregation method must be one of {AGGREGATORS}, got {method!r}")
