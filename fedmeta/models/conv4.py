"""Conv-4: the four-block convolutional network of few-shot image classification.

Vinyals et al. (2016) introduced it for Matching Networks; Finn, Abbeel & Levine (2017) used it
for MAML on Omniglot (stride-2 convolutions, no pooling) and MiniImagenet (2x2 max-pooling).
Each block is ``3x3 conv (channels filters) -> normalization -> ReLU`` followed by the
downsampling; the feature map of the last block is averaged over space into a ``channels``
vector, and a linear head maps it to the ``ways`` logits.

Normalization and per-task adaptation
-------------------------------------
``norm="batch"`` (the default, as in MAML's reference code) normalizes with the statistics of
the batch it is given and keeps **no running averages**. Under ``torch.func.vmap`` over tasks,
"the batch" is one task's support set (or query set), so every task is normalized by its own
statistics; nothing is shared across tasks and nothing is mutated in the inner loop, which is
what makes it safe under ``vmap`` + nested ``grad``. Its cost: it is transductive — a query
prediction depends on the other queries of the same task (Bronskill et al., 2020, TaskNorm),
so query sets should be class-balanced batches, as in every episode here.
``norm="group"`` (8 groups) and ``norm="layer"`` (one group) normalize each example on its own:
no batch dependence at all (the prediction for a single image is well defined), at some cost in
speed on the CPU. ``norm="none"`` is plain convolutions with biases; on glyphs it meta-trains
markedly slower than batch statistics (docs/glyphs.md). Running statistics (``nn.BatchNorm2d``'s
default) are never used: they would be state shared by all tasks, mutated on every forward
pass, and under ``vmap`` they are an in-place update of one buffer by many tasks at once.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from fedmeta.config import Config
from fedmeta.errors import ConfigError
from fedmeta.models.base import FunctionalModel, uniform_fan_in
from fedmeta.types import Params

__all__ = ["Conv4", "NORMS", "POOLS"]

NORMS = ("batch", "group", "layer", "none")
POOLS = ("stride", "max")
_GROUPS = 8


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, track_running_stats=False)
    if kind == "group":
        return nn.GroupNorm(_GROUPS, channels)
    if kind == "layer":
        return nn.GroupNorm(1, channels)
    return nn.Identity()


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, *, norm: str, pool: str) -> None:
        super().__init__()
        stride = 2 if pool == "stride" else 1
        self.conv = nn.Conv2d(cin, cout, kernel_size=3, stride=stride, padding=1, bias=norm == "none")
        self.norm = _norm(norm, cout)
        self.act = nn.ReLU()
        self.pool: nn.Module = nn.MaxPool2d(2) if pool == "max" else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.pool(self.act(self.norm(self.conv(x))))


class _SpatialMean(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(dim=(-2, -1))


class _Conv4Module(nn.Module):
    def __init__(self, in_channels: int, channels: int, outputs: int, *, norm: str, pool: str) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        cin = in_channels
        for _ in range(4):
            blocks.append(_Block(cin, channels, norm=norm, pool=pool))
            cin = channels
        blocks.append(_SpatialMean())
        self.body = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, outputs)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class Conv4(FunctionalModel):
    """Four conv blocks and a linear head, called functionally on a parameter dict.

    Parameters live under ``body.`` (the four blocks) and ``head.`` (the classifier), so ANIL
    adapts ``head.*`` only and :meth:`features` gives the ``channels``-dimensional embedding.

    Args:
        input_shape: ``(C, H, W)`` of one image; ``H`` and ``W`` at least 16 for ``pool="max"``.
        outputs: number of classes (ways).
        channels: filters per block (64 in Vinyals et al. and MAML on Omniglot).
        norm: ``"batch"`` | ``"group"`` | ``"layer"`` | ``"none"`` (see the module docstring).
        pool: ``"stride"`` (stride-2 convolutions) | ``"max"`` (2x2 max-pooling).

    Raises:
        ValueError: for a bad shape or option.
    """

    name = "conv4"

    def __init__(self, input_shape: tuple[int, ...], outputs: int, *, channels: int = 64, norm: str = "batch", pool: str = "stride") -> None:
        if len(input_shape) != 3:
            raise ValueError(f"Conv4 needs image inputs (C, H, W), got input shape {tuple(input_shape)}")
        if norm not in NORMS:
            raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if norm == "group" and channels % _GROUPS:
            raise ValueError(f"group norm needs channels divisible by {_GROUPS}, got {channels}")
        if pool == "max" and min(input_shape[1:]) < 16:
            raise ValueError(f"pool='max' halves the image four times; {tuple(input_shape[1:])} is smaller than 16x16")
        if channels < 1 or outputs < 1:
            raise ValueError(f"channels and outputs must be positive, got {channels} and {outputs}")
        self.input_shape = tuple(int(s) for s in input_shape)
        self.outputs = outputs
        self.channels = channels
        self.norm = norm
        self.pool = pool
        super().__init__(_Conv4Module(self.input_shape[0], channels, outputs, norm=norm, pool=pool))

    @classmethod
    def from_config(cls, cfg: Config, input_shape: tuple[int, ...], outputs: int) -> "Conv4":
        """Build from ``model.channels`` / ``model.norm`` / ``model.pool``.

        Raises:
            ConfigError: if the task's inputs are not images this network can take.
        """
        m = cfg.model
        try:
            return cls(input_shape, outputs, channels=m.channels, norm=m.norm, pool=m.pool)
        except ValueError as exc:
            raise ConfigError(f"config key 'model.name' is 'conv4' but {exc} (task '{cfg.task.name}')") from exc

    def init_params(self, gen: torch.Generator) -> Params:
        """He-uniform convolutions (ReLU gain), unit/zero normalization affine, fan-in uniform head."""
        params: Params = {}
        for name, shape in self.param_shapes.items():
            if name.endswith("conv.weight"):
                fan_in = int(math.prod(shape[1:]))
                params[name] = uniform_fan_in(gen, shape, fan_in) * math.sqrt(6.0)
            elif name.endswith("norm.weight"):
                params[name] = torch.ones(shape)
            elif name == "head.weight":
                params[name] = uniform_fan_in(gen, shape, shape[1])
            else:  # biases of conv, norm and head
                params[name] = torch.zeros(shape)
        return params

    def describe(self) -> dict[str, object]:
        """Shapes plus the options that change the function but not the shapes."""
        out = super().describe()
        out.update({"channels": self.channels, "norm": self.norm, "pool": self.pool, "input_shape": list(self.input_shape)})
        return out
