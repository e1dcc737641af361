"""The functional-model interface: an ``nn.Module`` skeleton called with an explicit parameter dict."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
from torch.func import functional_call, vmap

from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = ["FunctionalModel", "uniform_fan_in"]


def uniform_fan_in(gen: torch.Generator, shape: tuple[int, ...], fan_in: int) -> Tensor:
    """Draw ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` with ``gen`` (PyTorch's default Linear/Conv init)."""
    bound = 1.0 / math.sqrt(fan_in)
    return (torch.rand(shape, generator=gen) * 2.0 - 1.0) * bound


class FunctionalModel(ABC):
    """A network whose parameters live outside it, in a ``dict[str, Tensor]``.

    The module is only a skeleton: :meth:`forward` runs it with
    ``torch.func.functional_call`` on whatever parameters it is given, so adaptation never
    mutates the meta-parameters and the same code works under ``vmap`` and ``grad``.
    Parameters whose names start with :attr:`head_prefix` form the head that ANIL adapts;
    :meth:`features` and :meth:`head` split the forward pass there.

    Many tasks at once: :meth:`forward_tasks`, :meth:`features_tasks` and :meth:`head_tasks` take
    per-task parameters stacked along a leading task dimension (``{name: [T, *shape]}``) and
    inputs ``[T, N, *input_shape]``. The defaults ``vmap`` the single-task methods. A model that
    sets :attr:`batched_tasks` implements them natively, as one call for all tasks that plain
    (eager) autograd differentiates, twice for second order; the algorithms then compute their
    per-task meta-gradients that way instead of with ``vmap`` over nested ``torch.func.grad``
    (:meth:`fedmeta.algorithms.base.MetaAlgorithm.task_updates`).
    """

    name: str = ""
    head_prefix: str = "head."
    #: True when :meth:`forward_tasks` and friends are native batched implementations (the
    #: algorithms' batched eager path is used); False: the algorithms ``vmap`` over tasks.
    batched_tasks: bool = False
    #: True when the outputs are twice differentiable in the inputs with nonzero second derivatives
    #: (a smooth activation): what input-derivative constraints need.
    smooth: bool = False
    #: True when each example's output depends on that example alone (no batch statistics): what
    #: evaluating input derivatives of a whole batch at once needs.
    pointwise: bool = True

    @classmethod
    def from_config(cls, cfg: Config, input_shape: tuple[int, ...], outputs: int) -> FunctionalModel:
        """Build the model from its ``model.*`` options for a task family's inputs and outputs.

        Raises:
            ConfigError: if the options or the task's inputs do not suit the model.
        """
        raise NotImplementedError(f"{cls.__name__} cannot be built from a config")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Validate the ``model.*`` options this model owns (none by default).

        Config validation calls it for every registered model on every config, whichever model the
        config selects, so that a config never carries an invalid value; rules that apply only when
        this model is selected test ``cfg.model.name == cls.name``.

        Raises:
            ConfigError: naming the key and the bad value.
        """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.param_shapes: dict[str, tuple[int, ...]] = {k: tuple(v.shape) for k, v in module.named_parameters()}

    @abstractmethod
    def init_params(self, gen: torch.Generator) -> Params:
        """Fresh parameters drawn with ``gen`` (never the global RNG)."""

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """Outputs for inputs ``x`` (``[N, *input_shape]``) under ``params``."""
        return functional_call(self.module, params, (x,))

    def features(self, params: Params, x: Tensor) -> Tensor:
        """The penultimate representation (input to the head)."""
        body = {k[len("body.") :]: v for k, v in params.items() if k.startswith("body.")}
        return functional_call(self.module.body, body, (x,))  # type: ignore[arg-type]

    def head(self, params: Params, h: Tensor) -> Tensor:
        """The head applied to features ``h``."""
        n = len(self.head_prefix)
        head = {k[n:]: v for k, v in params.items() if k.startswith(self.head_prefix)}
        return functional_call(self.module.head, head, (h,))  # type: ignore[arg-type]

    def forward_tasks(self, params: Params, x: Tensor) -> Tensor:
        """Outputs ``[T, N, outputs]`` of ``T`` tasks.

        ``params`` are stacked ``[T, *shape]``, ``x`` is ``[T, N, *input_shape]``.

        Task ``t`` is computed exactly as ``forward({k: v[t]}, x[t])``, batch statistics included.
        """
        return vmap(self.forward)(params, x)

    def features_tasks(self, params: Params, x: Tensor) -> Tensor:
        """:meth:`features` of ``T`` tasks at once (stacked parameters, ``[T, N, ...]`` inputs)."""
        return vmap(self.features)(params, x)

    def head_tasks(self, params: Params, h: Tensor) -> Tensor:
        """:meth:`head` of ``T`` tasks at once (stacked head parameters, ``[T, N, features]`` inputs)."""
        return vmap(self.head)(params, h)

    def head_keys(self) -> list[str]:
        """Names of the head's parameters."""
        return [k for k in self.param_shapes if k.startswith(self.head_prefix)]

    def describe(self) -> dict[str, object]:
        """What a checkpoint records to check compatibility later."""
        return {"name": self.name, "param_shapes": {k: list(v) for k, v in self.param_shapes.items()}}
