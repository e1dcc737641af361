"""Quantile-based adaptive clipping (Andrew, Thakkar, McMahan & Ramaswamy, NeurIPS 2021).

Instead of a fixed clip norm ``C``, the server tracks the ``target_quantile`` (gamma) of the
clients' update norms. Each round every participant contributes the bit
``b_i = 1[||u_i|| <= C]``; the server releases the noisy fraction of unclipped updates

    b~ = (sum_i (b_i - 1/2) + N(0, sigma_b^2)) / E[n] + 1/2

and moves ``C`` geometrically: ``C <- C * exp(-eta * (b~ - gamma))``. Centring the bits makes one
client's influence on the released sum 1/2, so the count is a Gaussian mechanism of noise
multiplier ``2 sigma_b``.

Its privacy cost is paid out of the configured budget (the paper's Theorem 1): releasing the
clipped update sum with noise multiplier ``z_u`` *and* the count is one Gaussian mechanism of
noise multiplier ``(z_u^-2 + (2 sigma_b)^-2)^-1/2``. So with ``privacy.noise_multiplier = z`` the
update noise is raised to ``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` and the accountant is stepped with
the effective ``z`` the two releases add up to.

Under local DP each client noises its own centred bit with std ``sigma_b``; the server averages
the bits it receives (post-processing).

**Bounds against hostile clients.** Under local DP the bits are the clients' own claims: one client
sending a huge value would move ``C`` by an arbitrary factor in one round (to 0 or to infinity,
and every honest client's next round would fail on it). So the server's update is bounded, which
is post-processing and costs no privacy: ``C`` moves by at most the factor ``max_step``
(``privacy.clip_max_step``, default 2) per round, and stays within ``[min_clip_norm,
max_clip_norm]`` (``privacy.clip_norm_min`` / ``clip_norm_max``, default ``privacy.clip_norm``
/ 1000 and × 1000); a non-finite released fraction leaves ``C`` where it is. With the default
``clip_lr`` of 0.2 an honest step exceeds the factor 2 only when the released fraction is more
than 3.4 away from ``gamma``, i.e. never in practice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

__all__ = [
    "update_noise_multiplier",
    "effective_noise_multiplier",
    "clipped_indicator",
    "noisy_unclipped_fraction",
    "local_noisy_indicator",
    "fraction_from_local_indicators",
    "next_clip_norm",
    "AdaptiveClipState",
]


def update_noise_multiplier(noise_multiplier: float, count_stddev: float) -> float:
    """Noise multiplier left for the update sum once the noisy count is paid for.

    ``z_u = (z^-2 - (2 sigma_b)^-2)^-1/2`` (Andrew et al., 2021, Sec. 3.2).

    Args:
        noise_multiplier: the total (effective) ``z`` the accountant is charged.
        count_stddev: ``sigma_b``, the std of the noise on the centred count.

    Raises:
        ValueError: if ``2 sigma_b <= z`` (the count alone would cost the whole budget).
    """
    if noise_multiplier == 0:
        return 0.0
    if not 2 * count_stddev > noise_multiplier:
        raise ValueError(
            f"adaptive clipping needs clipped_count_stddev > noise_multiplier / 2, got "
            f"clipped_count_stddev={count_stddev:g} and noise_multiplier={noise_multiplier:g}"
        )
    return (noise_multiplier**-2 - (2 * count_stddev) ** -2) ** -0.5


def effective_noise_multiplier(update_multiplier: float, count_stddev: float) -> float:
    """The single noise multiplier that the update release and the count release add up to.

    ``(z_u^-2 + (2 sigma_b)^-2)^-1/2``; zero (no privacy) when either release is noiseless.
    """
    if update_multiplier == 0 or count_stddev == 0:
        return 0.0
    return (update_multiplier**-2 + (2 * count_stddev) ** -2) ** -0.5


def clipped_indicator(norm: float, clip_norm: float) -> float:
    """``1.0`` if an update of ``norm`` is within ``clip_norm`` (not clipped), else ``0.0``."""
    return 1.0 if norm <= clip_norm else 0.0


def noisy_unclipped_fraction(
    indicators: Sequence[float], *, count_stddev: float, expected_count: float, generator: torch.Generator
) -> float:
    """The released estimate of the fraction of updates within the clip norm (central DP).

    ``(sum_i (b_i - 1/2) + N(0, sigma_b^2)) / E[n] + 1/2``.

    Args:
        indicators: the bits ``b_i`` of the updates that arrived.
        count_stddev: ``sigma_b``.
        expected_count: ``E[n]`` (``q * clients_total``), not the number that arrived.
        generator: the source of the noise.
    """
    if not expected_count > 0:
        raise ValueError(f"expected_count must be positive, got {expected_count!r}")
    centred = sum(float(b) - 0.5 for b in indicators)
    noise = (
        float(torch.normal(0.0, float(count_stddev), size=(1,), generator=generator, dtype=torch.float64))
        if count_stddev > 0
        else 0.0
    )
    return (centred + noise) / expected_count + 0.5


def local_noisy_indicator(norm: float, clip_norm: float, *, count_stddev: float, generator: torch.Generator) -> float:
    """What a client sends under local DP: its centred bit ``b - 1/2`` plus ``N(0, sigma_b^2)``."""
    noise = (
        float(torch.normal(0.0, float(count_stddev), size=(1,), generator=generator, dtype=torch.float64))
        if count_stddev > 0
        else 0.0
    )
    return clipped_indicator(norm, clip_norm) - 0.5 + noise


def fraction_from_local_indicators(values: Sequence[float]) -> float | None:
    """Server side under local DP: the mean of the noisy centred bits, plus 1/2 (``None`` if none arrived)."""
    if not values:
        return None
    return sum(float(v) for v in values) / len(values) + 0.5


def next_clip_norm(clip_norm: float, unclipped_fraction: float, *, target_quantile: float, lr: float) -> float:
    """Geometric update ``C * exp(-eta (b~ - gamma))`` towards the ``gamma`` quantile of the norms."""
    return clip_norm * math.exp(-lr * (unclipped_fraction - target_quantile))


@dataclass(frozen=True)
class AdaptiveClipState:
    """The clip norm of a run with adaptive clipping, and the constants that move it.

    Attributes:
        clip_norm: the current ``C`` (starts at ``privacy.clip_norm``).
        target_quantile: ``gamma``.
        lr: ``eta`` (``privacy.clip_lr``).
        count_stddev: ``sigma_b``.
        min_clip_norm: the floor of ``C`` (``privacy.clip_norm_min``; 0: none).
        max_clip_norm: the ceiling of ``C`` (``privacy.clip_norm_max``; ``inf``: none).
        max_step: the largest factor ``C`` moves by in one round (``privacy.clip_max_step``; ``inf``: none).
    """

    clip_norm: float
    target_quantile: float
    lr: float
    count_stddev: float
    min_clip_norm: float = 0.0
    max_clip_norm: float = math.inf
    max_step: float = math.inf

    def updated(self, unclipped_fraction: float | None) -> AdaptiveClipState:
        """The state after a round whose released unclipped fraction is ``unclipped_fraction``.

        The geometric step is limited to a factor ``max_step`` either way and the result kept in
        ``[min_clip_norm, max_clip_norm]`` (see the module notes); ``None`` (nothing arrived) or a
        non-finite fraction leaves ``C`` as it is.
        """
        if unclipped_fraction is None or not math.isfinite(unclipped_fraction):
            return self
        exponent = -self.lr * (unclipped_fraction - self.target_quantile)  # as in next_clip_norm
        if math.isfinite(self.max_step):
            limit = math.log(self.max_step)
            exponent = min(limit, max(-limit, exponent))
        moved = self.clip_norm * math.exp(exponent)
        return replace(self, clip_norm=min(self.max_clip_norm, max(self.min_clip_norm, moved)))
