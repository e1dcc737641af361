"""ANIL (Raghu, Raghu, Bengio & Vinyals, 2020): adapt only the head in the inner loop.

Where the head's adaptation starts is a choice (``meta.head_init``):

* ``learned`` (ANIL as published): the meta-learned head. Its rows belong to episode labels
  0..N-1, which are a random relabelling per episode, so what it learns is mostly a bias to
  undo; it also ties the model to one number of ways.
* ``zero``: a zero head, so every class starts equal (Kao et al., 2022; Ye & Chao, 2022 show the
  learned head's permutation-sensitivity costs accuracy); the inner steps alone fit it.
* ``prototypes``: each class's row starts at its support prototype ``c`` (the mean support
  feature), ``w = 2c``, ``b = -||c||^2``, so the starting logits are the negative squared
  distances of Prototypical Networks up to a per-example constant (the initialization of
  Proto-MAML, Triantafillou et al., 2020). Way-agnostic, and the meta-gradient reaches the body
  through the prototypes as well. Classification only.

With ``zero`` and ``prototypes`` the stored head parameters are not used (their meta-gradient is
zero); they stay in the checkpoint so every model keeps one shape.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor
from torch.func import grad

from fedmeta.algorithms.base import (
    ALGORITHMS,
    adaptation_start,
    class_prototypes,
    eager_inner_sgd,
    inner_sgd,
    metric_dict,
    task_accuracy,
    task_loss,
    task_losses,
)
from fedmeta.algorithms.engine import TaskOps
from fedmeta.algorithms.maml import MAML
from fedmeta.errors import ConfigError
from fedmeta.models.base import FunctionalModel
from fedmeta.types import Params, model_part

__all__ = ["ANIL", "HEAD_INITS"]

#: Where the head's adaptation starts (``meta.head_init``; see the module docstring).
HEAD_INITS = ("learned", "zero", "prototypes")

#: The starting bias of a class absent from the support set (prototypes): its softmax weight is 0.
_ABSENT_BIAS = -1e30


@ALGORITHMS.register("anil")
class ANIL(MAML):
    """Almost No Inner Loop: the body is meta-learned, only the head adapts per task.

    Features of the support and query sets are computed once per task (the body does not change
    in the inner loop); the outer gradient reaches the body through them, exactly (second order
    through the head's inner steps). Adaptation at test time (:meth:`adapt_with_loss`,
    :meth:`adaptation_curve`) likewise runs the body once and takes the steps on the head.
    """

    name: ClassVar[str] = "anil"
    adapts: ClassVar[str] = "head only"

    def __init__(
        self, model: FunctionalModel, *, kind: str, inner_lr: float, inner_steps: int, head_init: str = "learned"
    ) -> None:
        super().__init__(model, kind=kind, inner_lr=inner_lr, inner_steps=inner_steps)
        self.check_options(kind=kind, head_init=head_init)
        self.head_init = head_init

    @classmethod
    def check_options(cls, *, kind: str | None, head_init: str, task: str | None = None) -> None:
        """``meta.head_init`` is one of :data:`HEAD_INITS`; ``prototypes`` needs classification tasks.

        Raises:
            ConfigError: naming ``meta.head_init`` and the bad value.
        """
        if head_init not in HEAD_INITS:
            raise ConfigError(
                f"config key 'meta.head_init' is {head_init!r}: head_init must be one of {', '.join(HEAD_INITS)}"
            )
        if head_init == "prototypes" and kind == "regression":
            where = f"task.name {task!r}; 'learned' and 'zero' work there" if task else "these are regression"
            raise ConfigError(
                "config key 'meta.head_init' must not be 'prototypes' for regression tasks (class prototypes need "
                "classification "
                f"tasks; {where}), got 'prototypes'"
            )

    @classmethod
    def build(
        cls, model: FunctionalModel, *, kind: str, inner_lr: float, inner_steps: int, head_init: str = "learned"
    ) -> ANIL:
        """ANIL with its ``head_init`` (checked by :meth:`check_options`)."""
        return cls(model, kind=kind, inner_lr=inner_lr, inner_steps=inner_steps, head_init=head_init)

    @classmethod
    def serves_any_ways(cls, *, head_init: str) -> bool:
        """A head rebuilt for each support set (``zero`` or ``prototypes``) serves any number of ways."""
        return head_init != "learned"

    @property
    def rebuilds_head(self) -> bool:
        """True for ``zero`` and ``prototypes``: each adaptation starts its head from the support set."""
        return self.serves_any_ways(head_init=self.head_init)

    def start_head(self, head: Params, h: Tensor, y: Tensor) -> Params:
        """The head the inner loop starts from, for features ``h`` ``[..., N, F]`` and labels ``y`` ``[..., N]``.

        Leading task dimensions are carried through (stacked heads ``[T, W, F]`` with ``[T, N, F]``
        features), and it is ``vmap``-safe (no data-dependent shapes).
        """
        if self.head_init == "learned":
            return head
        weight_key, bias_key = self._head_weight_bias(head)
        if self.head_init == "zero":
            # multiplied rather than fresh zeros: it stays in the autograd graph (with a zero
            # gradient), which the eager second-order inner loop differentiates through
            return {k: v * 0.0 for k, v in head.items()}
        prototypes, counts = class_prototypes(h, y, head[weight_key].shape[-2])
        # a class without support examples has no prototype: a bias no score can overcome keeps
        # it from being predicted (rather than a prototype at the origin)
        absent = torch.full_like(counts, _ABSENT_BIAS)
        bias = torch.where(counts > 0, -prototypes.pow(2).sum(dim=-1), absent)
        return {weight_key: 2.0 * prototypes, bias_key: bias}

    def _head_weight_bias(self, head: Params) -> tuple[str, str]:
        weights = [k for k in head if k.endswith("weight")]
        biases = [k for k in head if k.endswith("bias")]
        if len(weights) != 1 or len(biases) != 1:
            raise ValueError(f"head_init {self.head_init!r} needs a single linear head, got parameters {sorted(head)}")
        return weights[0], biases[0]

    def adapted_keys(self, meta: Params) -> list[str]:
        return self.model.head_keys()

    def objective(
        self, ops: TaskOps, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        """Query loss after the head's inner steps on body features computed once per set (second order)."""
        params, hs, hq = ops.embed_sets(meta, sx, qx)
        head0 = self.start_head({k: params[k] for k in self.model.head_keys()}, hs, sy)
        head, support_loss_pre = ops.sgd(
            lambda p: ops.loss(ops.head(p, hs), sy), head0, dict.fromkeys(head0, self.inner_lr), self.inner_steps
        )
        pred_q = ops.head(head, hq)
        state = {
            "adapted": {**params, **head},
            "head": head,
            "head0": head0,
            "hs": hs,
            "hq": hq,
            "support_loss_pre": support_loss_pre,
            "query_pred_post": pred_q,
        }
        return ops.loss(pred_q, qy), state

    def metrics(
        self, ops: TaskOps, meta: Params, state: dict[str, Any], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> dict[str, Tensor]:
        """The standard metrics from the head on the features the objective computed."""
        return metric_dict(
            self.kind,
            ops.loss,
            ops.accuracy,
            support_loss_pre=state["support_loss_pre"],
            support_loss_post=ops.loss(ops.head(state["head"], state["hs"]), sy),
            query_pred_pre=ops.head(state["head0"], state["hq"]),
            query_pred_post=state["query_pred_post"],
            query_y=qy,
        )

    # -- adaptation: the body once, the steps on the head ------------------------------------

    def adapt_with_loss(
        self, meta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool = False
    ) -> tuple[Params, Tensor]:
        """The head adapted on features computed once; the same result as the generic loop."""
        params = model_part(meta)
        h = self.model.features(params, x)
        head = self.start_head({k: params[k] for k in self.model.head_keys()}, h, y)

        def inner(p: Params) -> Tensor:
            return task_loss(self.kind, self.model.head(p, h), y)

        head, start_loss = inner_sgd(inner, head, dict.fromkeys(head, self.inner_lr), steps, first_order=first_order)
        return {**params, **head}, start_loss

    def adaptation_curve(
        self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int
    ) -> dict[str, Tensor]:
        """Query loss (and accuracy) after ``0..steps`` head steps, with the body run once per set."""
        params = {k: v.detach() for k, v in model_part(meta).items()}
        hs = self.model.features(params, sx)
        hq = self.model.features(params, qx)
        head = self.start_head({k: params[k] for k in self.model.head_keys()}, hs, sy)

        def inner(p: Params) -> Tensor:
            return task_loss(self.kind, self.model.head(p, hs), sy)

        losses, accs = [], []
        for step in range(steps + 1):
            pred = self.model.head(head, hq)
            losses.append(task_loss(self.kind, pred, qy))
            if self.kind == "classification":
                accs.append(task_accuracy(pred, qy))
            if step < steps:
                g = grad(inner)(head)
                head = {k: head[k] - self.inner_lr * g[k] for k in head}
        out = {"query_loss": torch.stack(losses)}
        if accs:
            out["query_accuracy"] = torch.stack(accs)
        return out

    # -- the batched eager path ----------------------------------------------------------------

    def _head_adapt_tasks(
        self, head: Params, h: Tensor, y: Tensor, steps: int, *, first_order: bool
    ) -> tuple[Params, Tensor]:
        """Inner steps of ``T`` stacked heads on features ``[T, N, F]``; with
        the per-task loss before the first step."""
        return eager_inner_sgd(
            lambda p: task_losses(self.kind, self.model.head_tasks(p, h), y),
            head,
            dict.fromkeys(head, self.inner_lr),
            steps,
            first_order=first_order,
        )

    def adapt_tasks(
        self, meta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool = False
    ) -> tuple[Params, Tensor]:
        """:meth:`adapt_with_loss` for ``T`` tasks at once (stacked parameters)."""
        params = adaptation_start(meta, first_order=first_order)
        with torch.set_grad_enabled(not first_order):
            h = self.model.features_tasks(params, x)
            head0 = self.start_head({k: params[k] for k in self.model.head_keys()}, h, y)
        head, start_loss = self._head_adapt_tasks(head0, h, y, steps, first_order=first_order)
        return {**params, **head}, start_loss
