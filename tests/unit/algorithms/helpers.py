"""Shared by the algorithm tests: which algorithms take regression tasks, and small float64 image episodes."""

from __future__ import annotations

import torch

from fedmeta.algorithms import ALGORITHMS
from fedmeta.errors import ConfigError
from fedmeta.types import TaskBatch


def regression_algorithms() -> list[str]:
    """The registered algorithms that take regression tasks (ProtoNets needs classes: test_protonet.py)."""
    names = []
    for name in sorted(ALGORITHMS):
        try:
            ALGORITHMS.get(name).check_options(kind="regression", head_init="learned")
        except ConfigError:
            continue
        names.append(name)
    return names


def perturbed(raw: dict[str, torch.Tensor], gen: torch.Generator) -> dict[str, torch.Tensor]:
    """``raw`` in float64, shifted so that every parameter (normalization affines too) matters in a comparison."""
    return {k: v.double() + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in raw.items()}


def image_tasks(
    shape: tuple[int, ...], ways: int, *, tasks: int = 3, support: int = 6, query: int = 9, seed: int = 1
) -> TaskBatch:
    """``tasks`` random float64 image episodes of ``ways`` classes (every class in each support set)."""
    gen = torch.Generator().manual_seed(seed)
    sx = torch.rand(tasks, support, *shape, generator=gen, dtype=torch.float64)
    qx = torch.rand(tasks, query, *shape, generator=gen, dtype=torch.float64)
    sy = torch.arange(support).remainder(ways).expand(tasks, -1).clone()
    qy = torch.randint(0, ways, (tasks, query), generator=gen)
    return TaskBatch(sx, sy, qx, qy, "classification")
