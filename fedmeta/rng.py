"""Deterministic random streams derived from the run seed and a purpose.

Every function that draws random numbers takes a ``torch.Generator``; this module derives those
generators from ``(seed, purpose, round, node, ...)`` so that the same config reproduces the same
run, and so that the federated path and the centralized reference draw identical tasks.
"""

from __future__ import annotations

import hashlib

import torch

__all__ = ["derive_seed", "make_generator"]


def derive_seed(seed: int, *keys: object) -> int:
    """Hash ``seed`` and ``keys`` into a 63-bit integer seed.

    Args:
        seed: the run's seed from the config.
        *keys: anything with a stable ``repr`` (strings, ints) naming the stream, e.g.
            ``("train", round, client_id)``.

    Returns:
        A non-negative integer below ``2**63`` that differs for different keys.
    """
    text = repr((int(seed), *keys)).encode()
    return int.from_bytes(hashlib.sha256(text).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(seed: int, *keys: object) -> torch.Generator:
    """Return a CPU ``torch.Generator`` seeded by :func:`derive_seed` of ``seed`` and ``keys``."""
    gen = torch.Generator()
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
