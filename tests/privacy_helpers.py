"""Helpers shared by the privacy tests: a tiny DP config and Opacus' own epsilon as the reference."""

from __future__ import annotations

import warnings
from typing import Any

from fedmeta.config import Config, config_from_dict

__all__ = ["dp_config", "opacus_rdp_epsilon"]


def dp_config(mode: str, *, rounds: int = 6, total: int = 12, per_round: int = 4, **privacy: Any) -> Config:
    """A tiny sinusoid run (16x16 MLP, 3 tasks a client) under ``mode``, noise seed 7, server SGD 0.05."""
    return config_from_dict(
        {
            "seed": 2,
            "task": {"name": "sinusoid", "shots": 5, "query": 5, "tasks_per_site": 12},
            "model": {"hidden": [16, 16]},
            "meta": {"algorithm": "maml", "tasks_per_client": 3, "outer_optimizer": "sgd", "outer_lr": 0.05},
            "federation": {
                "clients_total": total, "clients_per_round": per_round, "rounds": rounds,
                "sampling": "poisson" if mode == "client-central" else "uniform",
            },
            "privacy": {"mode": mode, "noise_seed": 7, "clip_norm": 0.5, "noise_multiplier": 1.2, **privacy},
            "eval": {"tasks": 20, "every": 3, "steps": 2},
        }
    )  # fmt: skip


def opacus_rdp_epsilon(sigma: float, q: float, steps: int, delta: float = 1e-5) -> float:
    """Epsilon straight from Opacus' RDPAccountant, stepped one release at a time (the reference)."""
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))
