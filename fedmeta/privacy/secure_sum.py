"""Fixed-point encoding of noisy updates for secure aggregation, and what the server learns from the sum.

Under ``privacy.mode: client-distributed`` every client clips its update to ``C`` and adds its
share ``N(0, s^2)``, ``s = sigma C / sqrt(t)``, of the noise; the masked sum is computed in
integers modulo ``M`` (Flower's SecAgg+: each coordinate is clipped to ``[-R, R]`` and
stochastically rounded to one of ``Q`` levels). This module holds the pure parts both transports
share:

* :func:`choose_fixed_point`: ``R`` from a Gaussian tail bound so that the probability of clipping
  any coordinate of any noisy update of a round is at most ``1e-9``, and ``Q`` as large as the
  bound ``m Q < M`` allows for a cohort of ``m`` (Flower's ``n x quantization_range < modulus``);
* :func:`encode_update`: what a client hands to the masking: its noisy update, each coordinate
  clipped to ``[-R, R]`` (counted), plus two *control* coordinates summed with it: a presence
  marker (the sum says how many updates it holds) and the client's clipped fraction (the sum says
  how many coordinates were clipped, without any client's own count leaving it);
* :func:`quantize` / :func:`sum_quantized`: the in-process equivalent of SecAgg+'s arithmetic (the
  centralized reference sums exactly what the masks would have hidden);
* :func:`decode_sum`: the decoded sum, split into the update part and the control coordinates;
* :func:`check_sum`: the bounds the server enforces on the unmasked sum (what per-update
  validation becomes when updates are masked).

No Flower import: the Flower side is :mod:`fedmeta.flower.secagg`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from fedmeta.errors import ConfigError
from fedmeta.types import Params

__all__ = [
    "CLIP_PROBABILITY",
    "MODULUS",
    "MAX_QUANTIZATION_RANGE",
    "MIN_QUANTIZATION_RANGE",
    "CONTROL_SIZE",
    "FixedPoint",
    "SecureSum",
    "choose_fixed_point",
    "fixed_point_for",
    "max_cohort",
    "encode_update",
    "quantize",
    "sum_quantized",
    "decode_sum",
    "check_sum",
]

#: The per-round bound on the probability that any coordinate of any noisy update is clipped.
CLIP_PROBABILITY = 1e-9
#: SecAgg+'s modulus (Flower's default ``modulus_range``, ``2**32``).
MODULUS = 2**32
#: The largest quantization range used: Flower rounds into ``int32`` (values up to ``Q``).
MAX_QUANTIZATION_RANGE = 2**30
#: The smallest quantization range accepted (``2**16`` levels over ``[-R, R]``); a cohort that
#: would need fewer is refused (``m Q < M``: at most ``M / 2**16 - 1`` summed updates).
MIN_QUANTIZATION_RANGE = 2**16
#: Control coordinates appended to every encoded update: presence, clipped fraction.
CONTROL_SIZE = 2


@dataclass(frozen=True)
class FixedPoint:
    """The fixed-point parameters of one run's secure sums.

    Attributes:
        clip_norm: ``C``, the L2 bound of a client's update.
        share_std: ``s``, the std of one client's noise share per coordinate.
        clipping_range: ``R``: every coordinate is clipped to ``[-R, R]`` before quantization.
        quantization_range: ``Q``: levels over ``[-R, R]`` (SecAgg+'s ``quantization_range``).
        modulus: ``M`` (SecAgg+'s ``modulus_range``).
        dimension: ``d``, the coordinates of one update (without the control coordinates).
        cohort: ``m``, the most updates one sum holds (``federation.clients_per_round``).
        clip_probability: the tail bound's value at ``R``: the probability that any coordinate of
            any of the ``m`` noisy updates is clipped, at most :data:`CLIP_PROBABILITY`.
    """

    clip_norm: float
    share_std: float
    clipping_range: float
    quantization_range: int
    modulus: int
    dimension: int
    cohort: int
    clip_probability: float

    @property
    def step(self) -> float:
        """One quantization level, ``2 R / Q``."""
        return 2.0 * self.clipping_range / self.quantization_range

    def error_bound(self, n: int) -> float:
        """The largest quantization error of one coordinate of a sum of ``n`` updates: ``n 2R/Q``.

        Stochastic rounding moves each client's coordinate by less than one level.
        """
        return n * self.step

    def error_std(self, n: int) -> float:
        """The std bound of a summed coordinate's quantization error, ``sqrt(n) R / Q`` (unbiased rounding)."""
        return math.sqrt(n) * self.step / 2.0

    def clipped_count_exact(self, n: int) -> bool:
        """Whether the summed clipped fraction decodes to an exact count for ``n`` updates (``2 n d / Q < 1/2``)."""
        return 2.0 * n * self.dimension / self.quantization_range < 0.5


def max_cohort(modulus: int = MODULUS) -> int:
    """The most updates one secure sum may hold: ``m Q < M`` with ``Q >=`` :data:`MIN_QUANTIZATION_RANGE`."""
    return (modulus - 1) // MIN_QUANTIZATION_RANGE


def choose_fixed_point(
    *, clip_norm: float, share_std: float, dimension: int, cohort: int, modulus: int = MODULUS
) -> FixedPoint:
    """``R``, ``Q`` and ``M`` for a cohort of ``cohort`` noisy updates of ``dimension`` coordinates.

    A coordinate of a noisy update is ``x_j = c_j + g_j`` with ``|c_j| <= C`` (the clipped update)
    and ``g_j ~ N(0, s^2)``, so ``P(|x_j| > R) <= P(|g_j| > R - C) <= 2 exp(-(R - C)^2 / (2 s^2))``
    (the Chernoff bound of the Gaussian tail). A union over the ``m d`` coordinates of a round
    (the two control coordinates never exceed ``R``) gives
    ``R = C + s sqrt(2 ln(2 m d / 1e-9))``. ``Q`` is the largest level count with ``m Q < M``
    (capped at :data:`MAX_QUANTIZATION_RANGE`), so that no sum of ``m`` quantized updates wraps.

    Args:
        clip_norm: ``C`` (> 0).
        share_std: ``s`` (>= 0).
        dimension: ``d`` (>= 1).
        cohort: ``m`` (>= 1).
        modulus: ``M``, a power of two.

    Returns:
        The :class:`FixedPoint`.

    Raises:
        ConfigError: naming ``federation.clients_per_round`` when ``m`` exceeds :func:`max_cohort`.
        ValueError: for a non-positive clip norm, dimension or cohort, or a negative std.
    """
    if not (clip_norm > 0 and math.isfinite(clip_norm)) or share_std < 0 or dimension < 1 or cohort < 1:
        raise ValueError(
            f"choose_fixed_point needs clip_norm > 0, share_std >= 0, dimension >= 1 and cohort >= 1, got "
            f"{clip_norm!r}, {share_std!r}, {dimension!r}, {cohort!r}"
        )
    if cohort > max_cohort(modulus):
        raise ConfigError(
            f"config key 'federation.clients_per_round' must be at most {max_cohort(modulus)} under privacy.mode "
            f"'client-distributed' (SecAgg+ sums m updates of Q levels modulo {modulus}: m x Q < modulus with "
            f"Q >= {MIN_QUANTIZATION_RANGE}), got {cohort}"
        )
    coords = cohort * dimension
    z = math.sqrt(2.0 * math.log(2.0 * coords / CLIP_PROBABILITY))
    radius = clip_norm + share_std * z
    bound = min(1.0, 2.0 * coords * math.exp(-((radius - clip_norm) ** 2) / (2.0 * share_std**2))) if share_std else 0.0
    levels = min(MAX_QUANTIZATION_RANGE, (modulus - 1) // cohort)
    return FixedPoint(clip_norm, share_std, radius, levels, modulus, dimension, cohort, bound)


def fixed_point_for(
    *, clip_norm: float, noise_multiplier: float, threshold: int, dimension: int, cohort: int
) -> FixedPoint:
    """:func:`choose_fixed_point` for shares ``s = sigma C / sqrt(t)`` (what server and clients both compute)."""
    from fedmeta.privacy.clipping import noise_share_std

    std = noise_share_std(noise_multiplier=noise_multiplier, clip_norm=clip_norm, num_shares=threshold)
    return choose_fixed_point(clip_norm=clip_norm, share_std=std, dimension=dimension, cohort=cohort)


@dataclass(frozen=True)
class SecureSum:
    """What a secure aggregation delivers to the round loop: the unmasked sum and who is in it.

    Attributes:
        arrays: the decoded sum as float64 arrays, one per parameter in the reference's key order,
            then the :data:`CONTROL_SIZE` control coordinates.
        survivors: the client ids whose masked updates the sum holds (counted by fedmeta, not read
            from the protocol's threshold).
        fixed_point: the encoding the clients used.
        nbytes: bytes the server received for the round (all protocol stages).
    """

    arrays: tuple[np.ndarray, ...]
    survivors: tuple[int, ...]
    fixed_point: FixedPoint
    nbytes: int = 0


def encode_update(update: Params, fp: FixedPoint) -> tuple[list[np.ndarray], int]:
    """A client's noisy update as the arrays it hands to the masking, and its clipped-coordinate count.

    Every coordinate is clipped to ``[-R, R]`` here (the masking would clip it anyway; counting it
    here lets the count travel inside the sum). Two control coordinates follow: ``R / 2`` (the
    presence marker) and ``R k / d`` for ``k`` clipped coordinates; both lie within ``[-R, R]``.

    Args:
        update: the clipped, noised update (keys in the reference's order).
        fp: the run's fixed point.

    Returns:
        The float64 arrays (the parameters, then the control array) and ``k`` (stays on the client).
    """
    r = fp.clipping_range
    arrays, clipped = [], 0
    for value in update.values():
        arr = value.detach().to(torch.float64).cpu().numpy()
        clipped += int(np.count_nonzero(np.abs(arr) > r))
        arrays.append(np.clip(arr, -r, r))
    arrays.append(np.array([r / 2.0, r * clipped / fp.dimension], dtype=np.float64))
    return arrays, clipped


def quantize(arrays: Sequence[np.ndarray], fp: FixedPoint, rng: np.random.Generator) -> list[np.ndarray]:
    """SecAgg+'s stochastic quantization of clipped arrays into ``[0, Q]`` (int64), from a seeded ``rng``.

    ``(clip(x, -R, R) + R) Q / (2 R)`` rounded up or down with the probability that makes it unbiased,
    as Flower's ``quantize`` does (with its global NumPy generator).
    """
    r, q = fp.clipping_range, fp.quantization_range
    out = []
    for arr in arrays:
        pre = (np.clip(arr, -r, r) + r) * (q / (2.0 * r))
        up = np.ceil(pre)
        out.append((up - (rng.random(pre.shape) < up - pre)).astype(np.int64))
    return out


def sum_quantized(quantized: Sequence[Sequence[np.ndarray]], fp: FixedPoint) -> tuple[np.ndarray, ...]:
    """The decoded sum of quantized updates: ``sum q_i 2R/Q - n R`` per coordinate (what unmasking yields).

    The integer sum is taken modulo ``M`` as the masks force; with ``n Q < M`` it never wraps.
    """
    n = len(quantized)
    if n == 0:
        raise ValueError("a secure sum needs at least one update")
    r, q = fp.clipping_range, fp.quantization_range
    totals = [np.zeros_like(a, dtype=np.int64) for a in quantized[0]]
    for arrays in quantized:
        totals = [(t + a) % fp.modulus for t, a in zip(totals, arrays, strict=True)]
    return tuple(t.astype(np.float64) * (2.0 * r / q) - n * r for t in totals)


def decode_sum(total: SecureSum, reference: Params) -> tuple[Params, float, float]:
    """The update part of a secure sum keyed like ``reference``, and its two control sums.

    Returns:
        ``(sum of the noisy updates, presence count estimate, clipped-coordinate total estimate)``.

    Raises:
        ValueError: if the arrays do not match the reference's shapes plus the control array.
    """
    arrays = total.arrays
    keys = list(reference)
    if len(arrays) != len(keys) + 1 or arrays[-1].shape != (CONTROL_SIZE,):
        raise ValueError(
            f"a secure sum has {len(arrays)} arrays; expected {len(keys)} parameters and a control array of "
            f"{CONTROL_SIZE}"
        )
    out: Params = {}
    for key, arr in zip(keys, arrays[:-1]):
        ref = reference[key]
        if tuple(arr.shape) != tuple(ref.shape):
            raise ValueError(f"a secure sum's '{key}' has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        out[key] = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float64)).to(ref.dtype)
    r, d = total.fixed_point.clipping_range, total.fixed_point.dimension
    control = arrays[-1]
    return out, float(control[0]) / (r / 2.0), float(control[1]) * d / r


def check_sum(total: SecureSum, reference: Params, *, min_survivors: int) -> tuple[Params | None, dict[str, object]]:
    """The server's checks on an unmasked sum; the sum of the noisy updates if it passes.

    A client's update is bounded before masking (clipped to ``C``, every coordinate to ``[-R, R]``);
    after unmasking the server can only bound the sum: every coordinate within ``n R`` (plus the
    quantization error), the presence marker equal to ``n`` (``n`` updates, no more, no fewer),
    the clipped total within ``[0, n d]``, and the L2 norm within ``n C`` plus a ``1 - 1e-9``
    bound of the noise norm ``sqrt(n) s (sqrt(d) + sqrt(2 ln 1e9))`` plus ``sqrt(d)`` times the
    quantization error bound. A client that sends garbage can make a round fail these checks
    (the round then moves nothing) but cannot move the model further than a valid update.

    Args:
        total: the unmasked sum.
        reference: the meta-parameters (keys, shapes, dtypes).
        min_survivors: ``t``.

    Returns:
        ``(sum or None, entries for the round's privacy record)``: ``survivors``, ``clipped_coordinates``,
        ``quantization_error_bound``, ``quantization_error_std`` and, when a check failed, ``sum_check``
        (why).
    """
    fp = total.fixed_point
    n = len(total.survivors)
    info: dict[str, object] = {
        "survivors": n,
        "quantization_error_bound": fp.error_bound(n),
        "quantization_error_std": fp.error_std(n),
        "clip_probability_bound": fp.clip_probability,
    }
    if n < min_survivors:
        info["sum_check"] = f"{n} survivors, fewer than privacy.min_survivors={min_survivors}"
        return None, info
    try:
        summed, presence, clipped = decode_sum(total, reference)
    except ValueError as exc:
        info["sum_check"] = str(exc)
        return None, info
    slack = fp.error_bound(n)
    clipped_count: float = round(clipped) if fp.clipped_count_exact(n) else clipped
    info["clipped_coordinates"] = clipped_count
    why = None
    flat = torch.cat([v.reshape(-1).to(torch.float64) for v in summed.values()]) if summed else torch.zeros(0)
    if not bool(torch.isfinite(flat).all()):
        why = "the sum is not finite"
    elif abs(presence - n) >= 0.5:
        why = f"its presence marker counts {presence:.3f} updates, not the {n} survivors"
    elif not (-0.5 <= clipped <= n * fp.dimension + 0.5):
        why = f"its clipped-coordinate total {clipped:.3f} lies outside [0, {n * fp.dimension}]"
    elif flat.numel() and float(flat.abs().max()) > n * fp.clipping_range + slack:
        why = f"a coordinate exceeds n R = {n * fp.clipping_range:.4g}"
    else:
        d = fp.dimension
        noise = math.sqrt(n) * fp.share_std * (math.sqrt(d) + math.sqrt(2.0 * math.log(1.0 / CLIP_PROBABILITY)))
        bound = n * fp.clip_norm + noise + math.sqrt(d) * slack
        norm = float(flat.norm())
        if norm > bound:
            why = f"its L2 norm {norm:.4g} exceeds the bound {bound:.4g} of {n} clipped noisy updates"
    if why is not None:
        info["sum_check"] = why
        return None, info
    return summed, info
