"""Client meta-updates before a rule combines them: shape and finiteness checks, stacking, norms."""

from __future__ import annotations

import math

import torch

from fedmeta.errors import UpdateRejected
from fedmeta.types import Params

__all__ = ["validate_update", "stack", "global_norm"]


def global_norm(update: Params) -> float:
    """L2 norm of all tensors of ``update`` taken together (in float64)."""
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
    """Stack a list of updates into ``{key: [C, *shape]}``.

    Raises:
        ValueError: if ``updates`` is empty.
    """
    if not updates:
        raise ValueError("no updates to stack")
    return {k: torch.stack([u[k] for u in updates]) for k in updates[0]}
