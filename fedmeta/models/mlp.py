"""Fully connected network, MAML's regression model (two hidden layers of 40, ReLU, by default)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from fedmeta.models.base import FunctionalModel, uniform_fan_in
from fedmeta.registry import require
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = ["MLP", "ACTIVATIONS"]

#: ``model.activation``: the hidden layers' nonlinearity, and whether it is smooth (has nonzero
#: second derivatives almost everywhere, so input-derivative constraints can act on the model).
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], bool]] = {
    "relu": (F.relu, False),
    "tanh": (torch.tanh, True),
    "silu": (F.silu, True),
    "softplus": (F.softplus, True),
}


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
    """``input -> [Linear -> activation] * len(hidden) -> Linear`` with a separate head for ANIL.

    Args:
        input_shape: shape of one example (flattened before the first layer).
        hidden: widths of the hidden layers (MAML: ``(40, 40)``).
        out_features: number of outputs.
        activation: a name in :data:`ACTIVATIONS` (MAML: ``relu``).

    Raises:
        ValueError: for an unknown activation.
    """

    name = "mlp"

    def __init__(
        self, input_shape: tuple[int, ...], hidden: tuple[int, ...], out_features: int, *, activation: str = "relu"
    ) -> None:
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.activation = activation
        self._act, self.smooth = ACTIVATIONS[activation]
        self.input_shape = tuple(input_shape)
        self.in_features = int(math.prod(input_shape))
        self.hidden = tuple(hidden)
        self.out_features = out_features
        net = _MLPModule(self.in_features, self.hidden, out_features)
        super().__init__(net)
        self._hidden_layers = [f"body.{i}" for i, m in enumerate(net.body) if isinstance(m, nn.Linear)]

    @classmethod
    def from_config(cls, cfg: Config, input_shape: tuple[int, ...], outputs: int) -> MLP:
        """Build from ``model.hidden`` and ``model.activation``."""
        return cls(input_shape, cfg.model.hidden, outputs, activation=cfg.model.activation)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``model.hidden`` must be a non-empty list of positive widths; ``model.activation`` a known name."""
        hidden = cfg.model.hidden
        why = "must be a non-empty list of positive widths"
        require(all(h >= 1 for h in hidden) and len(hidden) >= 1, "model.hidden", list(hidden), why)
        act = cfg.model.activation
        require(act in ACTIVATIONS, "model.activation", act, f"must be one of {', '.join(ACTIVATIONS)}")

    # A hand-written forward pass: torch.func.functional_call swaps module parameters on every
    # call, which costs about a third of a small MLP's meta-gradient under vmap.
    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return self.head(params, self.features(params, x))

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        h = x.flatten(start_dim=-len(self.input_shape)) if len(self.input_shape) > 1 else x
        for layer in self._hidden_layers:
            h = self._act(F.linear(h, params[f"{layer}.weight"], params[f"{layer}.bias"]))
        return h

    def head(self, params: Params, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, params["head.weight"], params["head.bias"])

    def init_params(self, gen: torch.Generator) -> Params:
        params: Params = {}
        for name, shape in self.param_shapes.items():
            layer = name.rsplit(".", 1)[0]
            fan_in = self.param_shapes[f"{layer}.weight"][1]
            params[name] = uniform_fan_in(gen, shape, fan_in)
        return params
