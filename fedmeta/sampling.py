"""Which clients take part in a round: deterministic from ``(seed, round)``.

Both the federated server and the centralized reference call :func:`sample_clients`, so a
config and seed select the same cohort on both paths.
"""

from __future__ import annotations

import torch

from fedmeta.rng import make_generator

__all__ = ["sample_clients"]


def sample_clients(
    seed: int, round_idx: int, clients_total: int, clients_per_round: int, *, method: str = "uniform"
) -> list[int]:
    """Client ids (``0 .. clients_total-1``) taking part in round ``round_idx``.

    Args:
        seed: the run's seed.
        round_idx: the round (1-based).
        clients_total: number of registered clients.
        clients_per_round: the cohort size (``uniform``), or the expected size (``poisson``).
        method: ``"uniform"`` draws exactly ``clients_per_round`` clients without replacement;
            ``"poisson"`` includes each client independently with probability
            ``q = clients_per_round / clients_total``, the sampling DP-SGD accounting assumes
            (the cohort size then varies and may be zero).

    Returns:
        Sorted client ids.
    """
    if not 1 <= clients_per_round <= clients_total:
        raise ValueError(f"clients_per_round must be in [1, {clients_total}], got {clients_per_round}")
    gen = make_generator(seed, "sample", round_idx)
    if method == "uniform":
        chosen = torch.randperm(clients_total, generator=gen)[:clients_per_round]
    elif method == "poisson":
        q = clients_per_round / clients_total
        chosen = torch.nonzero(torch.rand(clients_total, generator=gen) < q).flatten()
    else:
        raise ValueError(f"method must be 'uniform' or 'poisson', got {method!r}")
    return sorted(int(c) for c in chosen)
