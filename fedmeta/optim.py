"""The server optimizer: applies an aggregated meta-gradient to the meta-parameters (FedOpt style)."""

from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

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
        """Restore the state saved by :meth:`state_dict` (copied, never shared).

        The moments and step counts come from ``state``; the hyperparameters stay this
        optimizer's own (they come from the config, and an outer-lr schedule sets the rate
        every round), so a damaged group option cannot break a later step.

        Raises:
            ValueError: if ``state`` is not this optimizer's state (other parameters, a damaged
                structure, moments of other shapes or not finite); the optimizer is then unchanged.
        """
        before = copy.deepcopy(self._opt.state_dict())
        try:
            if not isinstance(state, dict) or not isinstance(state.get("state"), dict):
                raise ValueError("it has no 'state' mapping")
            saved = state.get("param_groups")
            own = before["param_groups"]
            if not isinstance(saved, list) or len(saved) != len(own) or not all(isinstance(g, dict) for g in saved):
                raise ValueError(f"it does not have {len(own)} parameter group(s)")
            groups = []
            for mine, theirs in zip(own, saved):
                ids = theirs.get("params")
                if (
                    not isinstance(ids, list)
                    or len(ids) != len(mine["params"])
                    or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids)
                    or len(set(ids)) != len(ids)
                ):
                    raise ValueError(f"a parameter group does not list {len(mine['params'])} distinct parameters")
                groups.append({**mine, "params": ids})
            self._opt.load_state_dict(copy.deepcopy({"state": state["state"], "param_groups": groups}))
            self._check_moments()
        except (ValueError, TypeError, KeyError, IndexError, RuntimeError) as exc:
            self._opt.load_state_dict(before)
            raise ValueError(f"not a {self.name} state of these {len(self.keys)} parameters: {exc}") from exc

    #: the per-parameter entries a non-empty state of each optimizer holds
    _ENTRIES: ClassVar[dict[str, set[str]]] = {"adam": {"step", "exp_avg", "exp_avg_sq"}, "sgd": {"momentum_buffer"}}

    def _check_moments(self) -> None:
        """Every restored per-parameter state has its entries: finite tensors of its parameter's shape."""
        for tensor in self._tensors:
            entry = self._opt.state.get(tensor, {})
            if not isinstance(entry, dict):
                raise ValueError(f"a parameter's state is a {type(entry).__name__}, not a mapping")
            if not entry:
                continue
            if set(entry) != self._ENTRIES[self.name]:
                raise ValueError(f"a parameter's state has entries {sorted(map(str, entry))}")
            for key, value in entry.items():
                if key == "momentum_buffer" and value is None:
                    continue
                if key == "step":
                    ok = isinstance(value, torch.Tensor) and value.dim() == 0 and value.is_floating_point()
                    if not ok or not math.isfinite(float(value)) or float(value) < 0:
                        raise ValueError(f"a step count is {value!r}")
                    continue
                if not isinstance(value, torch.Tensor) or value.shape != tensor.shape:
                    shape = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
                    raise ValueError(f"'{key}' has shape {shape}, its parameter {tuple(tensor.shape)}")
                if not value.is_floating_point() or not bool(torch.isfinite(value).all()):
                    raise ValueError(f"'{key}' is not a finite floating-point tensor")

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
