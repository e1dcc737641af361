"""Where the randomness of differential privacy comes from.

DP noise and DP sampling must be unknown to whoever the guarantee is against: noise derived from
the run's public ``seed`` (which travels in every checkpoint and summary) could simply be
regenerated and subtracted, and a cohort or task sample that can be recomputed voids the
amplification by subsampling the accountant counts on. So privacy code draws from its own
generators: seeded from ``privacy.noise_seed`` when a test sets one (reproducible, and documented
as void against anyone who knows it), otherwise from the operating system's entropy pool, never
written anywhere. The generators are still ``torch.Generator`` objects passed in explicitly.
"""

from __future__ import annotations

import secrets

import torch

from fedmeta.rng import make_generator

__all__ = ["secret_seed", "privacy_generator"]


def secret_seed(noise_seed: int | None) -> int:
    """The seed privacy randomness derives from.

    Args:
        noise_seed: ``privacy.noise_seed``; ``None`` draws 63 fresh bits from ``secrets``.

    Returns:
        ``noise_seed`` itself, or a secret random integer in ``[0, 2**63)``.
    """
    if noise_seed is not None:
        return int(noise_seed)
    return secrets.randbits(63)


def privacy_generator(seed: int, *keys: object) -> torch.Generator:
    """A CPU generator for one privacy draw, derived from a (secret) ``seed`` and ``keys``.

    Args:
        seed: from :func:`secret_seed`.
        *keys: what the draw is for, e.g. ``("noise", round_idx)`` or
            ``("noise", round_idx, client_id)``; different keys give independent streams.
    """
    return make_generator(seed, "dp", *keys)
