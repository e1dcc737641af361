"""Evaluation on held-out tasks: adapt on each task's support set, measure on its query set."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.func import vmap

from fedmeta.algorithms.base import MetaAlgorithm
from fedmeta.types import Params, TaskBatch

__all__ = ["EvalResult", "evaluate", "mean_ci95"]


def mean_ci95(values: Tensor) -> tuple[float, float]:
    """Mean and half-width of the normal 95% confidence interval of the mean (1.96 · s / √n)."""
    v = values.double().flatten()
    n = v.numel()
    if n == 0:
        return math.nan, math.nan
    std = float(v.std(unbiased=True)) if n > 1 else 0.0
    return float(v.mean()), 1.96 * std / math.sqrt(n)


@dataclass(frozen=True)
class EvalResult:
    """Per-task adaptation curves on held-out tasks.

    Attributes:
        loss: ``[T, steps + 1]`` query loss after ``0..steps`` inner steps.
        accuracy: same for classification accuracy, else ``None``.
    """

    loss: Tensor
    accuracy: Tensor | None

    @property
    def steps(self) -> int:
        """Number of adaptation steps evaluated."""
        return int(self.loss.shape[1]) - 1

    def summary(self) -> dict[str, float | list[float] | int]:
        """Means and 95% intervals before adaptation, after one step and after all steps."""
        out: dict[str, float | list[float] | int] = {"tasks": int(self.loss.shape[0]), "steps": self.steps}
        pairs = [("loss", self.loss)] + ([("accuracy", self.accuracy)] if self.accuracy is not None else [])
        for name, curve in pairs:
            pre, pre_ci = mean_ci95(curve[:, 0])
            one, one_ci = mean_ci95(curve[:, 1])
            post, post_ci = mean_ci95(curve[:, -1])
            out[f"pre_adapt_{name}"] = pre
            out[f"pre_adapt_{name}_ci95"] = pre_ci
            out[f"post_adapt_{name}_1step"] = one
            out[f"post_adapt_{name}_1step_ci95"] = one_ci
            out[f"post_adapt_{name}"] = post
            out[f"post_adapt_{name}_ci95"] = post_ci
            out[f"{name}_curve"] = [float(x) for x in curve.double().mean(dim=0)]
        return out


def evaluate(algo: MetaAlgorithm, meta: Params, tasks: TaskBatch, *, steps: int, batch: int = 200) -> EvalResult:
    """Adapt ``meta`` to every task for ``steps`` inner steps and record query metrics.

    Tasks are processed ``batch`` at a time, each chunk vectorized with ``vmap``.

    Args:
        algo: the algorithm (decides what adapts and with which step sizes).
        meta: meta-parameters to start from.
        tasks: held-out tasks.
        steps: inner steps at test time.
        batch: tasks per vectorized chunk (bounds memory).
    """
    meta = {k: v.detach() for k, v in meta.items()}
    fn = vmap(lambda sx, sy, qx, qy: algo.adaptation_curve(meta, sx, sy, qx, qy, steps))
    losses, accs = [], []
    for start in range(0, tasks.num_tasks, batch):
        chunk = tasks.slice(start, start + batch)
        out = fn(chunk.support_x, chunk.support_y, chunk.query_x, chunk.query_y)
        losses.append(out["query_loss"].detach())
        if "query_accuracy" in out:
            accs.append(out["query_accuracy"].detach())
    return EvalResult(torch.cat(losses), torch.cat(accs) if accs else None)
