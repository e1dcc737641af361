"""The task-family interface every data source implements."""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from fedmeta.types import TaskBatch

__all__ = ["TaskFamily", "SPLITS"]

#: ``"train"`` tasks are what clients meta-train on; ``"eval"`` tasks are held out and never
#: appear in training (disjoint parameter draws for generated families, disjoint classes or
#: scripts for classification, a separate folder for on-disk sites).
SPLITS = ("train", "eval")


class TaskFamily(ABC):
    """A distribution over tasks, each with an explicit support/query split.

    Implementations are deterministic given the ``torch.Generator`` they are passed and never
    touch the global random state.
    """

    #: ``"regression"`` or ``"classification"``.
    kind: str = "regression"
    #: shape of one input example (without batch dimensions).
    input_shape: tuple[int, ...] = (1,)
    #: number of outputs of the model (regression targets or classes per episode).
    output_dim: int = 1

    @abstractmethod
    def sample_params(self, gen: torch.Generator, n: int, split: str) -> Tensor:
        """Draw ``n`` task descriptions (``[n, P]``) from the ``split`` part of the family."""

    @abstractmethod
    def make_tasks(self, params: Tensor, gen: torch.Generator) -> TaskBatch:
        """Draw fresh support and query examples for the tasks described by ``params``."""

    def sample(self, gen: torch.Generator, n: int, split: str = "train") -> TaskBatch:
        """Draw ``n`` new tasks with their support/query examples."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.make_tasks(self.sample_params(gen, n, split), gen)


def uniform(gen: torch.Generator, n: int, low: float, high: float) -> Tensor:
    """``n`` draws from U[low, high) in float32 using ``gen``."""
    return low + (high - low) * torch.rand(n, generator=gen)
