"""Shared type aliases and small containers used across fedmeta.

The meta-parameters of a run are one flat ``dict[str, Tensor]`` (``Params``): the model's
parameters under their module names, for Meta-SGD the learned per-parameter inner learning
rates under ``lr.<name>``, and the meta-learned parameters of objective terms (TRLearner's relation
heads) under ``term.<term>.<name>``. Everything that moves between client and server, gets clipped, noised,
aggregated or checkpointed is such a dict, so the same code handles every algorithm.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

__all__ = [
    "Params", "StepSizes", "LossFn", "TaskBatch", "LR_PREFIX", "TERM_PREFIX", "model_part", "lr_part", "term_part"
]

Params = dict[str, Tensor]
#: Inner-loop step size per adapted parameter: a float, or a learned tensor (Meta-SGD).
StepSizes = dict[str, Tensor | float]
#: A loss of parameters: a scalar for one task, ``[T]`` for stacked tasks.
LossFn = Callable[[Params], Tensor]

#: Key prefix of Meta-SGD's learned inner learning rates inside a meta-parameter dict.
LR_PREFIX = "lr."
#: Key prefix of objective terms' meta-learned parameters (``term.<term name>.<parameter>``).
TERM_PREFIX = "term."


def model_part(meta: Params) -> Params:
    """Return the model parameters of a meta-parameter dict (without learning rates or term parameters)."""
    return {k: v for k, v in meta.items() if not k.startswith((LR_PREFIX, TERM_PREFIX))}


def term_part(meta: Params, term: str) -> Params:
    """Return objective term ``term``'s parameters of a meta-parameter dict, keyed without their prefix."""
    prefix = f"{TERM_PREFIX}{term}."
    return {k[len(prefix) :]: v for k, v in meta.items() if k.startswith(prefix)}


def lr_part(meta: Params) -> Params:
    """Return Meta-SGD learning rates keyed by the parameter they scale (prefix removed)."""
    n = len(LR_PREFIX)
    return {k[n:]: v for k, v in meta.items() if k.startswith(LR_PREFIX)}


@dataclass(frozen=True)
class TaskBatch:
    """A batch of ``T`` tasks, each with an explicit support and query split.

    Attributes:
        support_x: ``[T, S, *input_shape]`` support inputs.
        support_y: ``[T, S, out]`` float targets (regression) or ``[T, S]`` int64 labels.
        query_x: ``[T, Q, *input_shape]`` query inputs.
        query_y: targets of the query inputs, shaped like ``support_y``.
        kind: ``"regression"`` or ``"classification"``.
        params: optional ``[T, P]`` ground-truth task parameters (e.g. amplitude and phase), used
            by tests and by constraint generators; never sent over the network.
        ids: optional per-task identifiers (e.g. class ids or task file names) for bookkeeping.
    """

    support_x: Tensor
    support_y: Tensor
    query_x: Tensor
    query_y: Tensor
    kind: str
    params: Tensor | None = None
    ids: tuple[str, ...] | None = field(default=None)

    @property
    def num_tasks(self) -> int:
        """Number of tasks ``T`` in the batch."""
        return int(self.support_x.shape[0])

    def slice(self, start: int, stop: int) -> TaskBatch:
        """Return tasks ``start:stop`` as a new batch."""
        return TaskBatch(
            self.support_x[start:stop],
            self.support_y[start:stop],
            self.query_x[start:stop],
            self.query_y[start:stop],
            self.kind,
            None if self.params is None else self.params[start:stop],
            None if self.ids is None else self.ids[start:stop],
        )

    def select(self, index: Tensor) -> TaskBatch:
        """Return the tasks at ``index`` (a 1-D integer tensor), in that order, as a new batch."""
        picks = index.tolist()
        return TaskBatch(
            self.support_x[index],
            self.support_y[index],
            self.query_x[index],
            self.query_y[index],
            self.kind,
            None if self.params is None else self.params[index],
            None if self.ids is None else tuple(self.ids[i] for i in picks),
        )

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None) -> TaskBatch:
        """Move the batch to ``device`` (and floating inputs/targets to ``dtype`` if given)."""

        def move(t: Tensor) -> Tensor:
            if dtype is not None and t.is_floating_point():
                return t.to(device=device, dtype=dtype)
            return t.to(device=device)

        return TaskBatch(
            move(self.support_x),
            move(self.support_y),
            move(self.query_x),
            move(self.query_y),
            self.kind,
            None if self.params is None else move(self.params),
            self.ids,
        )

    @staticmethod
    def concat(batches: list[TaskBatch]) -> TaskBatch:
        """Concatenate batches of the same kind and shapes along the task dimension."""
        if not batches:
            raise ValueError("TaskBatch.concat needs at least one batch")
        kinds = {b.kind for b in batches}
        if len(kinds) != 1:
            raise ValueError(f"cannot concatenate task batches of kinds {sorted(kinds)}")
        params = None
        if all(b.params is not None for b in batches):
            params = torch.cat([b.params for b in batches if b.params is not None])
        ids = None
        if all(b.ids is not None for b in batches):
            ids = tuple(i for b in batches for i in (b.ids or ()))
        return TaskBatch(
            torch.cat([b.support_x for b in batches]),
            torch.cat([b.support_y for b in batches]),
            torch.cat([b.query_x for b in batches]),
            torch.cat([b.query_y for b in batches]),
            batches[0].kind,
            params,
            ids,
        )
