"""Pure clipping and Gaussian-noise functions over meta-parameter dicts (the Gaussian mechanism).

Everything here is a function of its arguments: no state, no global RNG (the noise generator is
passed in), nothing mutated in place. An update is a ``Params`` dict; its L2 norm is taken over
*all* its tensors together — model parameters and, for Meta-SGD, the learned ``lr.`` rates — so
clipping bounds the whole contribution of one client (or one task), which is what the
sensitivity of the Gaussian mechanism (Dwork & Roth, 2014, Thm. A.1; Abadi et al., 2016) is
computed from.

Used by the server for client-level central DP, by clients for local DP, and ready for the
secure-aggregation split of the noise (:func:`noise_share_std`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from fedmeta.types import Params

__all__ = [
    "global_l2_norm",
    "clip_factor",
    "clip_by_global_norm",
    "gaussian_noise",
    "add_gaussian_noise",
    "clip_factors",
    "weighted_sum",
    "clipped_sum",
    "privatize_update",
    "central_private_mean",
    "noise_share_std",
]


def global_l2_norm(update: Params) -> float:
    """L2 norm of all tensors of ``update`` taken together, computed in float64."""
    total = 0.0
    for value in update.values():
        total += float(value.detach().double().pow(2).sum())
    return math.sqrt(total)


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, clip_norm / norm)``: the factor that brings an update of ``norm`` within ``clip_norm``."""
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm!r}")
    if norm <= clip_norm:
        return 1.0
    return clip_norm / norm


def clip_by_global_norm(update: Params, clip_norm: float) -> tuple[Params, float]:
    """Scale ``update`` so that its global L2 norm is at most ``clip_norm``.

    Args:
        update: a meta-update (any keys, Meta-SGD rates included).
        clip_norm: the bound ``C > 0``.

    Returns:
        The clipped update (new tensors; unchanged values when already within the bound) and the
        norm *before* clipping.

    Raises:
        ValueError: if ``clip_norm`` is not positive or the update is not finite.
    """
    norm = global_l2_norm(update)
    if not math.isfinite(norm):
        raise ValueError("cannot clip an update that contains NaN or Inf")
    factor = clip_factor(norm, clip_norm)
    return {k: v.detach() * factor for k, v in update.items()}, norm


def gaussian_noise(reference: Params, std: float, generator: torch.Generator) -> Params:
    """Independent ``N(0, std**2)`` noise shaped like ``reference`` (keys drawn in sorted order).

    Args:
        reference: gives keys, shapes, dtypes and devices.
        std: the standard deviation (``0`` gives zeros and draws nothing).
        generator: the source of randomness (see :mod:`fedmeta.privacy.randomness`).

    Raises:
        ValueError: if ``std`` is negative or not finite.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"noise std must be a non-negative number, got {std!r}")
    out: Params = {}
    for key in sorted(reference):
        ref = reference[key]
        if std == 0:
            out[key] = torch.zeros_like(ref)
            continue
        noise = torch.normal(0.0, std, size=tuple(ref.shape), generator=generator, dtype=torch.float64)
        out[key] = noise.to(dtype=ref.dtype, device=ref.device)
    return {k: out[k] for k in reference}


def add_gaussian_noise(update: Params, std: float, generator: torch.Generator) -> Params:
    """``update + N(0, std**2 I)`` as new tensors."""
    noise = gaussian_noise(update, std, generator)
    return {k: v.detach() + noise[k] for k, v in update.items()}


def _stacked(updates: Sequence[Params], reference: Params) -> dict[str, torch.Tensor]:
    return {k: torch.stack([u[k].detach() for u in updates]).double() for k in reference}


def clip_factors(
    updates: Sequence[Params], clip_norm: float, *, reference: Params
) -> tuple[torch.Tensor, list[float]]:
    """Every update's clip factor ``min(1, clip_norm / norm)`` (vectorized over the updates, in float64).

    Args:
        updates: the client (or task) updates; may be empty.
        clip_norm: the per-update bound.
        reference: keys of an update.

    Returns:
        The factors (a float64 tensor, one per update) and every update's norm before clipping.

    Raises:
        ValueError: if ``clip_norm`` is not positive or an update is not finite.
    """
    if not clip_norm > 0:
        raise ValueError(f"clip_norm must be positive, got {clip_norm!r}")
    if not updates:
        return torch.zeros(0, dtype=torch.float64), []
    stacked = _stacked(updates, reference)
    norms = torch.sqrt(sum(v.pow(2).flatten(1).sum(1) for v in stacked.values()))  # type: ignore[arg-type]
    if not bool(torch.isfinite(norms).all()):
        raise ValueError("cannot clip an update that contains NaN or Inf")
    # min(1, C / norm), as clip_factor; a zero update has an infinite ratio and keeps factor 1
    return torch.clamp(clip_norm / norms, max=1.0), norms.tolist()


def weighted_sum(updates: Sequence[Params], factors: torch.Tensor, *, reference: Params) -> Params:
    """``sum_i factors_i * updates_i``, in one float64 pass, cast back to each key's dtype.

    Args:
        updates: the updates; may be empty (the sum is zeros).
        factors: one float64 factor per update (e.g. :func:`clip_factors`).
        reference: keys, shapes and dtypes of an update.
    """
    if not updates:
        return {k: torch.zeros_like(v) for k, v in reference.items()}
    stacked = _stacked(updates, reference)
    return {k: torch.tensordot(factors, v, dims=1).to(reference[k].dtype) for k, v in stacked.items()}


def clipped_sum(updates: Sequence[Params], clip_norm: float, *, reference: Params) -> tuple[Params, list[float]]:
    """Sum of the updates, each clipped to ``clip_norm`` first (vectorized over the updates).

    Args:
        updates: the client (or task) updates; may be empty.
        clip_norm: the per-update bound.
        reference: keys, shapes and dtypes of an update (the sum of no updates is zeros).

    Returns:
        The clipped sum and every update's norm before clipping.

    Raises:
        ValueError: if ``clip_norm`` is not positive or an update is not finite.
    """
    factors, norms = clip_factors(updates, clip_norm, reference=reference)
    return weighted_sum(updates, factors, reference=reference), norms


def privatize_update(
    update: Params, *, clip_norm: float, noise_std: float, generator: torch.Generator
) -> tuple[Params, float]:
    """Clip one update and add Gaussian noise: what a client sends under local DP.

    Under local DP ``noise_std = noise_multiplier * clip_norm``; under a secure-aggregation split
    each of ``n`` clients would add :func:`noise_share_std` instead, so that only the sum carries
    the full noise.

    Returns:
        The privatized update and the norm before clipping (which must not leave the client).
    """
    clipped, norm = clip_by_global_norm(update, clip_norm)
    return add_gaussian_noise(clipped, noise_std, generator), norm


def central_private_mean(
    updates: Sequence[Params],
    *,
    reference: Params,
    clip_norm: float,
    noise_multiplier: float,
    expected_count: float,
    generator: torch.Generator,
) -> tuple[Params, list[float]]:
    """DP-FedAvg's aggregate (McMahan et al., 2018): clipped sum plus noise, over the expected count.

    ``(sum_i clip(u_i, C) + N(0, (z C)^2 I)) / E[n]``. Dividing by the *expected* number of
    participants (``q * clients_total`` under Poisson sampling), not the number that replied,
    keeps the sensitivity of the released mean at ``C / E[n]`` whatever the cohort turned out to be.

    Args:
        updates: the updates that arrived (possibly none).
        reference: keys, shapes and dtypes of an update.
        clip_norm: ``C``.
        noise_multiplier: ``z``; the noise std on the sum is ``z * C``.
        expected_count: the expected number of participants, ``> 0``.
        generator: source of the noise.

    Returns:
        The private mean and the norms of the updates before clipping (server-side only).

    Raises:
        ValueError: for a non-positive ``expected_count`` or negative ``noise_multiplier``.
    """
    if not expected_count > 0:
        raise ValueError(f"expected_count must be positive, got {expected_count!r}")
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be non-negative, got {noise_multiplier!r}")
    total, norms = clipped_sum(updates, clip_norm, reference=reference)
    noisy = add_gaussian_noise(total, noise_multiplier * clip_norm, generator)
    return {k: v / expected_count for k, v in noisy.items()}, norms


def noise_share_std(*, noise_multiplier: float, clip_norm: float, num_shares: int) -> float:
    """Std each of ``num_shares`` parties adds so that the *sum* carries ``N(0, (z C)^2)``.

    Independent Gaussians add their variances, so ``n`` shares of std ``z C / sqrt(n)`` sum to
    std ``z C``. This is the per-client noise of distributed DP under secure aggregation, where
    the server only ever sees the sum; if fewer than ``n`` shares arrive the sum carries less
    noise, so a deployment must size ``num_shares`` by the minimum number of survivors.
    """
    if num_shares < 1:
        raise ValueError(f"num_shares must be at least 1, got {num_shares}")
    return noise_multiplier * clip_norm / math.sqrt(num_shares)
