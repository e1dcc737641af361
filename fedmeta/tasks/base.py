"""The task-family interface every data source implements."""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from fedmeta.types import TaskBatch

if TYPE_CHECKING:
    from fedmeta.config import Config

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

    #: the ``task.name`` that selects the family (registered in :data:`fedmeta.tasks.TASK_FAMILIES`).
    name: ClassVar[str] = ""
    #: the ``model.name`` values the family's tasks fit (``None``: any model); config refuses others.
    models: ClassVar[tuple[str, ...] | None] = None
    #: ``"regression"`` or ``"classification"``.
    kind: str = "regression"
    #: shape of one input example (without batch dimensions).
    input_shape: tuple[int, ...] = (1,)
    #: number of outputs of the model (regression targets or classes per episode).
    output_dim: int = 1
    #: whether a federated client draws from its own share (:meth:`for_client`) rather than the whole family.
    per_client: ClassVar[bool] = False
    #: whether each client is a site with its own data on disk: a simulation node then plays one
    #: site only (never two logical clients on one site's data), so ``simulation.pool`` is refused.
    site_data: ClassVar[bool] = False

    @classmethod
    def from_config(cls, cfg: Config, *, site: str | Path | None = None) -> TaskFamily:
        """Build the family from its ``task.*`` options.

        Args:
            cfg: the run configuration.
            site: for families read from disk, the site folder (default: the config's).

        Raises:
            ConfigError: if the options do not allow the family.
            DataFormatError: if data on disk does not match the documented format.
        """
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config")

    @classmethod
    def for_client(cls, cfg: Config, client_id: int) -> TaskFamily:
        """The share of the family that federated client ``client_id`` trains on (``per_client`` families).

        Raises:
            ConfigError: if the client's share is too small for the config's episodes.
            DataFormatError: if data on disk does not match the documented format.
        """
        raise NotImplementedError(f"{cls.__name__} has no per-client shares")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Validate the ``task.*`` options this family owns (none by default).

        Config validation calls it for every registered family on every config, whichever family
        the config selects, so that a config never carries an invalid value; rules that apply only
        when this family is selected test ``cfg.task.name == cls.name``.

        Raises:
            ConfigError: naming the key and the bad value.
        """

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
