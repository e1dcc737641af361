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

Many tasks in one call
----------------------
The forward pass is written with ``torch.nn.functional`` on the parameter dict (no
``functional_call``). :meth:`Conv4.forward_tasks` runs ``T`` tasks with their own parameters
in one pass by folding the task dimension into the channels: the images of all tasks become
one ``[N, T·C, H, W]`` tensor, each convolution is a grouped convolution with ``T`` groups
(task ``t``'s filters see only task ``t``'s channels), and per-task batch statistics are plain
batch normalization over that tensor, whose ``T·C`` channels each belong to one task (group
and layer norm become ``T·G`` and ``T`` groups). Task ``t``'s result is exactly the
single-task forward pass of ``t``'s parameters on ``t``'s images; ordinary autograd
differentiates it, twice for second-order MAML, which on the CPU is faster than ``vmap`` over
nested ``torch.func.grad`` (docs/glyphs.md, "Speed").
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fedmeta.errors import ConfigError
from fedmeta.models.base import FunctionalModel, uniform_fan_in
from fedmeta.registry import require
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = ["Conv4", "NORMS", "POOLS"]

NORMS = ("batch", "group", "layer", "none")
POOLS = ("stride", "max")
_GROUPS = 8
_EPS = 1e-5


def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels, eps=_EPS, track_running_stats=False)
    if kind == "group":
        return nn.GroupNorm(_GROUPS, channels, eps=_EPS)
    if kind == "layer":
        return nn.GroupNorm(1, channels, eps=_EPS)
    return nn.Identity()


def _flat(t: Tensor | None) -> Tensor | None:
    """A per-channel vector, or ``T`` of them stacked, as one ``[T·C]`` vector."""
    return None if t is None else t.reshape(-1)


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
        batched_tasks: let the algorithms use :meth:`forward_tasks` (one grouped pass for all
            tasks, eager autograd) instead of ``vmap`` over tasks; the two give the same
            gradients, the batched pass is faster on the CPU (False is for comparisons).

    Raises:
        ValueError: for a bad shape or option.
    """

    name = "conv4"

    def __init__(
        self,
        input_shape: tuple[int, ...],
        outputs: int,
        *,
        channels: int = 64,
        norm: str = "batch",
        pool: str = "stride",
        batched_tasks: bool = True,
    ) -> None:
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
        self.batched_tasks = batched_tasks
        # batch normalization couples the examples of a batch
        self.pointwise = norm != "batch"
        self._stride = 2 if pool == "stride" else 1
        super().__init__(_Conv4Module(self.input_shape[0], channels, outputs, norm=norm, pool=pool))

    # -- forward passes (hand-written: functional_call would swap module parameters per call) --

    def _body(self, params: Params, h: Tensor, tasks: int) -> Tensor:
        """The four blocks on ``[N, tasks·C, H, W]`` (tasks folded into channels); returns ``[N, tasks·channels]``.

        Parameters are single (``tasks == 1``) or stacked ``[tasks, *shape]``; either way they
        are flattened so that task ``t`` owns channel block ``t`` of every layer.
        """
        for i in range(4):
            pre = f"body.{i}."
            w = params[pre + "conv.weight"]
            h = F.conv2d(
                h,
                w.reshape(-1, *w.shape[-3:]),
                _flat(params.get(pre + "conv.bias")),
                stride=self._stride,
                padding=1,
                groups=tasks,
            )
            if self.norm == "batch":
                # statistics over (N, H, W) per channel, i.e. per task: no running averages
                h = F.batch_norm(
                    h,
                    None,
                    None,
                    _flat(params[pre + "norm.weight"]),
                    _flat(params[pre + "norm.bias"]),
                    training=True,
                    eps=_EPS,
                )
            elif self.norm != "none":
                groups = _GROUPS if self.norm == "group" else 1
                h = F.group_norm(
                    h, tasks * groups, _flat(params[pre + "norm.weight"]), _flat(params[pre + "norm.bias"]), eps=_EPS
                )
            h = F.relu(h)
            if self.pool == "max":
                h = F.max_pool2d(h, 2)
        return h.mean(dim=(-2, -1))

    def forward(self, params: Params, x: Tensor) -> Tensor:
        """Logits ``[N, outputs]`` for images ``x`` ``[N, C, H, W]``."""
        return self.head(params, self.features(params, x))

    def features(self, params: Params, x: Tensor) -> Tensor:
        """The ``channels``-dimensional embedding ``[N, channels]`` (input of the head)."""
        return self._body(params, x, 1)

    def head(self, params: Params, h: Tensor) -> Tensor:
        """Logits from features."""
        return F.linear(h, params["head.weight"], params["head.bias"])

    def forward_tasks(self, params: Params, x: Tensor) -> Tensor:
        """Logits ``[T, N, outputs]`` of ``T`` tasks in one pass (see the module docstring)."""
        return self.head_tasks(params, self.features_tasks(params, x))

    def features_tasks(self, params: Params, x: Tensor) -> Tensor:
        """Embeddings ``[T, N, channels]`` of ``T`` tasks' images ``[T, N, C, H, W]`` under stacked parameters."""
        tasks, n = x.shape[0], x.shape[1]
        folded = x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:])
        return self._body(params, folded, tasks).view(n, tasks, -1).transpose(0, 1)

    def head_tasks(self, params: Params, h: Tensor) -> Tensor:
        """Logits ``[T, N, outputs]`` from features ``[T, N, channels]`` under stacked head parameters."""
        return torch.baddbmm(params["head.bias"].unsqueeze(1), h, params["head.weight"].transpose(1, 2))

    @classmethod
    def from_config(cls, cfg: Config, input_shape: tuple[int, ...], outputs: int) -> Conv4:
        """Build from ``model.channels`` / ``model.norm`` / ``model.pool``.

        Raises:
            ConfigError: if the task's inputs are not images this network can take.
        """
        m = cfg.model
        try:
            return cls(input_shape, outputs, channels=m.channels, norm=m.norm, pool=m.pool)
        except ValueError as exc:
            raise ConfigError(f"config key 'model.name' is 'conv4' but {exc} (task '{cfg.task.name}')") from exc

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``model.channels`` / ``model.norm`` / ``model.pool`` in range; group norm's 8 groups divide the channels."""
        m = cfg.model
        if m.name == cls.name:
            why = "applies to model.name 'mlp' only (conv4's blocks use ReLU)"
            require(m.activation == "relu", "model.activation", m.activation, why)
        require(m.channels >= 1, "model.channels", m.channels, "must be at least 1")
        require(m.norm in NORMS, "model.norm", m.norm, f"must be one of {', '.join(NORMS)}")
        require(m.pool in POOLS, "model.pool", m.pool, f"must be one of {', '.join(POOLS)}")
        if m.name == cls.name and m.norm == "group":
            why = "must be a multiple of 8 for model.norm 'group' (8 groups)"
            require(m.channels % _GROUPS == 0, "model.channels", m.channels, why)

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
        out.update(
            {"channels": self.channels, "norm": self.norm, "pool": self.pool, "input_shape": list(self.input_shape)}
        )
        return out
