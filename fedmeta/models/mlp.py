"""Fully connected ReLU network, MAML's regression model (two hidden layers of 40 by default)."""

from __future__ import annotations

import math

import torch
from torch import nn

from fedmeta.models.base import FunctionalModel, uniform_fan_in
from fedmeta.types import Params

__all__ = ["MLP"]


class _MLPModule(nn.Module):
    def __init__(self, in_features: int, hidden: tuple[int, ...], out_features: int) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten(start_dim=1)]
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class MLP(FunctionalModel):
    """``input -> [Linear -> ReLU] * len(hidden) -> Linear`` with a separate head for ANIL.

    Args:
        input_shape: shape of one example (flattened before the first layer).
        hidden: widths of the hidden layers (MAML: ``(40, 40)``).
        out_features: number of outputs.
    """

    name = "mlp"

    def __init__(self, input_shape: tuple[int, ...], hidden: tuple[int, ...], out_features: int) -> None:
        self.in_features = int(math.prod(input_shape))
        self.hidden = tuple(hidden)
        self.out_features = out_features
        super().__init__(_MLPModule(self.in_features, self.hidden, out_features))

    def init_params(self, gen: torch.Generator) -> Params:
        params: Params = {}
        for name, shape in self.param_shapes.items():
            layer = name.rsplit(".", 1)[0]
            fan_in = self.param_shapes[f"{layer}.weight"][1]
            params[name] = uniform_fan_in(gen, shape, fan_in)
        return params
