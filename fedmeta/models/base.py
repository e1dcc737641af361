"""The functional-model interface: an ``nn.Module`` skeleton called with an explicit parameter dict."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedmeta.types import Params

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
    """

    name: str = ""
    head_prefix: str = "head."

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

    def head_keys(self) -> list[str]:
        """Names of the head's parameters."""
        return [k for k in self.param_shapes if k.startswith(self.head_prefix)]

    def describe(self) -> dict[str, object]:
        """What a checkpoint records to check compatibility later."""
        return {"name": self.name, "param_shapes": {k: list(v) for k, v in self.param_shapes.items()}}
