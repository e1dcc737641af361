"""The server optimizer: applies an aggregated meta-gradient to the meta-parameters (FedOpt style)."""

from __future__ import annotations

import copy
from typing import Any

import torch

from fedmeta.types import Params

__all__ = ["ServerOptimizer"]


class ServerOptimizer:
    """SGD (with optional momentum) or Adam over a meta-parameter dict.

    The aggregated client update is treated as a gradient (a pseudo-gradient for Reptile and
    FedAvg), as in Reddi et al.'s adaptive federated optimization. The optimizer owns copies of
    the meta-parameters; :meth:`step` returns new detached tensors and never changes a dict the
    caller holds.

    Args:
        params: initial meta-parameters.
        name: ``"adam"`` or ``"sgd"``.
        lr: step size.
        momentum: SGD momentum (ignored by Adam).
    """

    def __init__(self, params: Params, *, name: str, lr: float, momentum: float = 0.0) -> None:
        self.keys = sorted(params)
        self._tensors = [params[k].detach().clone().requires_grad_(True) for k in self.keys]
        if name == "adam":
            self._opt: torch.optim.Optimizer = torch.optim.Adam(self._tensors, lr=lr)
        elif name == "sgd":
            self._opt = torch.optim.SGD(self._tensors, lr=lr, momentum=momentum)
        else:
            raise ValueError(f"outer optimizer must be 'adam' or 'sgd', got {name!r}")
        self.name = name

    def set_lr(self, lr: float) -> None:
        """Use step size ``lr`` from the next :meth:`step` on (an outer-lr schedule sets it every round)."""
        for group in self._opt.param_groups:
            group["lr"] = float(lr)

    @property
    def params(self) -> Params:
        """Current meta-parameters (detached copies)."""
        return {k: t.detach().clone() for k, t in zip(self.keys, self._tensors)}

    def step(self, gradient: Params) -> Params:
        """Apply one step with ``gradient`` (same keys and shapes) and return the new parameters."""
        if set(gradient) != set(self.keys):
            raise ValueError(f"gradient keys {sorted(gradient)} do not match parameters {self.keys}")
        for k, t in zip(self.keys, self._tensors):
            t.grad = gradient[k].detach().to(t.dtype).clone()
        self._opt.step()
        self._opt.zero_grad(set_to_none=True)
        return self.params

    def state_dict(self) -> dict[str, Any]:
        """A copy of the optimizer state (moments, step counts) for checkpoints.

        Copied because torch hands out references to live moment tensors that later steps
        update in place.
        """
        return copy.deepcopy(self._opt.state_dict())

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state saved by :meth:`state_dict` (copied, never shared)."""
        self._opt.load_state_dict(copy.deepcopy(state))

    def reset(self, params: Params, state: dict[str, Any]) -> None:
        """Go back to ``params`` and the optimizer state ``state`` (a :meth:`state_dict`), e.g. to undo a step.

        Args:
            params: the meta-parameters to continue from (same keys and shapes).
            state: the optimizer state to continue with.

        Raises:
            ValueError: if ``params`` has other keys than the optimizer's.
        """
        if set(params) != set(self.keys):
            raise ValueError(f"parameter keys {sorted(params)} do not match the optimizer's {self.keys}")
        with torch.no_grad():
            for k, t in zip(self.keys, self._tensors):
                t.copy_(params[k].to(t.dtype))
        self.load_state_dict(state)
