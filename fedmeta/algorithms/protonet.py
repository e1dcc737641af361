"""Prototypical Networks (Snell, Swersky & Zemel, 2017): classify by distance to class prototypes.

A metric-based learner with no inner loop. The model's body (everything but its head, the split
ANIL uses) embeds the examples; each class's prototype ``c_k`` is the mean embedding of its
support examples; a query ``x`` gets the logits ``-||f(x) - c_k||^2`` (squared Euclidean
distance, the paper's choice), and the outer objective is the query cross-entropy. Its
meta-gradient is the ordinary gradient of that loss with respect to the body: the prototypes
depend on the body too, and the gradient goes through them.

``meta.inner_steps`` and ``meta.inner_lr`` are **ignored** (there is nothing to step), and so is
``eval.steps``: an adaptation curve is flat, every point the prototype classifier. The model's
head parameters are never used (their meta-gradient is zero); they stay in the checkpoint so
every model keeps one shape.

Adapted models: what "adapting to a support set" yields (:meth:`ProtoNet.adapt_with_loss`, used by
``fedmeta adapt`` and the personalized models) is the model itself with its linear head set to
``w_k = 2 c_k``, ``b_k = -||c_k||^2``. Its logits ``2 c_k·f(x) - ||c_k||^2`` are the negative
squared distances plus ``||f(x)||^2``, the same for every class, so softmax, loss and predictions
are those of the prototype classifier (Snell et al., §2.4: a ProtoNet is a linear model on the
embedding). That is what makes the checkpoint way-agnostic (the head is rebuilt from each support
set) and lets every path that runs an ordinary model run a ProtoNet. A class without support
examples has no prototype and is never predicted (its bias is ``-1e30``, as in ANIL's
prototype head). Classification only.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from fedmeta.algorithms.base import (
    ALGORITHMS,
    MetaAlgorithm,
    adaptation_start,
    class_prototypes,
    metric_dict,
    task_accuracy,
    task_loss,
    task_losses,
)
from fedmeta.algorithms.engine import PerTaskOps, TaskOps
from fedmeta.errors import ConfigError
from fedmeta.models.base import FunctionalModel
from fedmeta.types import Params, model_part

__all__ = ["ProtoNet", "prototype_logits"]

#: The logit of a class absent from the support set: its softmax weight is 0.
_ABSENT_LOGIT = -1e30


def prototype_logits(hq: Tensor, prototypes: Tensor, counts: Tensor) -> Tensor:
    """Negative squared Euclidean distances of query embeddings to the class prototypes.

    Args:
        hq: query embeddings ``[..., Q, F]``.
        prototypes: class means ``[..., W, F]``.
        counts: support examples per class ``[..., W]`` (a class with none gets ``-1e30``).

    Returns:
        Logits ``[..., Q, W]``. Leading task dimensions are carried through; ``vmap``-safe.
    """
    distances = (hq.unsqueeze(-2) - prototypes.unsqueeze(-3)).pow(2).sum(dim=-1)  # [..., Q, W]
    return torch.where(counts.unsqueeze(-2) > 0, -distances, torch.full_like(distances, _ABSENT_LOGIT))


@ALGORITHMS.register("protonet")
class ProtoNet(MetaAlgorithm):
    """Prototypical Networks: prototypes are mean support embeddings, logits negative squared distances.

    Args:
        model: a functional model with a body/head split (:meth:`FunctionalModel.features`); the
            number of ways is the head's number of outputs (its rows are rebuilt per task).
        kind: must be ``"classification"``.
        inner_lr: ignored (validated by the base class only).
        inner_steps: ignored.

    Raises:
        ConfigError: for regression tasks (naming ``meta.algorithm``).
    """

    name: ClassVar[str] = "protonet"
    adapts: ClassVar[str] = "no parameters (the head is rebuilt from the class prototypes)"

    def __init__(self, model: FunctionalModel, *, kind: str, inner_lr: float, inner_steps: int) -> None:
        self.check_options(kind=kind, head_init="learned")
        super().__init__(model, kind=kind, inner_lr=inner_lr, inner_steps=inner_steps)

    @classmethod
    def check_options(cls, *, kind: str | None, head_init: str, task: str | None = None) -> None:
        """Prototypes need classes; ``meta.head_init`` stays ``learned`` (the head is never used).

        Raises:
            ConfigError: naming ``meta.algorithm`` for regression tasks (``meta.head_init`` for another head).
        """
        super().check_options(kind=kind, head_init=head_init, task=task)
        if kind == "regression":
            where = f"task.name {task!r} is" if task else "these are"
            raise ConfigError(
                "config key 'meta.algorithm' is 'protonet' (Prototypical Networks), which needs classification tasks "
                f"(class prototypes); {where} regression"
            )

    @classmethod
    def serves_any_ways(cls, *, head_init: str) -> bool:
        """Always: the head is rebuilt from every support set."""
        return True

    @property
    def rebuilds_head(self) -> bool:
        """Always: adaptation sets the head to the prototype classifier."""
        return True

    # -- the prototype classifier (one task, or T stacked tasks: leading dimensions carried) ---

    def _head_weight_bias(self) -> tuple[str, str]:
        keys = self.model.head_keys()
        weights = [k for k in keys if k.endswith("weight")]
        biases = [k for k in keys if k.endswith("bias")]
        if len(weights) != 1 or len(biases) != 1:
            raise ValueError(
                f"protonet needs a single linear head to hold the prototypes, got parameters {sorted(keys)}"
            )
        return weights[0], biases[0]

    def start_head(self, head: Params, h: Tensor, y: Tensor) -> Params:
        """The linear head of the prototype classifier for support embeddings ``h`` ``[..., N, F]`` and labels ``y``.

        ``w_k = 2 c_k``, ``b_k = -||c_k||^2`` (``-1e30`` for a class without support examples):
        the negative squared distances up to a per-example constant.
        """
        weight_key, bias_key = self._head_weight_bias()
        prototypes, counts = class_prototypes(h, y, head[weight_key].shape[-2])
        bias = torch.where(counts > 0, -prototypes.pow(2).sum(dim=-1), torch.full_like(counts, _ABSENT_LOGIT))
        return {weight_key: 2.0 * prototypes, bias_key: bias}

    def objective(
        self, ops: TaskOps, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> tuple[Tensor, dict[str, Any]]:
        """Query cross-entropy of the negative squared distances to the support prototypes (no inner loop)."""
        params, hs, hq = ops.embed_sets(meta, sx, qx)
        weight_key, _ = self._head_weight_bias()
        prototypes, counts = class_prototypes(hs, sy, params[weight_key].shape[-2])
        query_logits = prototype_logits(hq, prototypes, counts)
        state = {
            "params": params,
            "hs": hs,
            "sy": sy,
            "prototypes": prototypes,
            "counts": counts,
            "query_logits": query_logits,
        }
        return ops.loss(query_logits, qy), state

    def adapted_model(self, state: dict[str, Any]) -> Params:
        """The adapted model of an objective's state: the body with the prototype classifier's head."""
        weight_key, bias_key = self._head_weight_bias()
        prototypes, counts = state["prototypes"], state["counts"]
        bias = torch.where(counts > 0, -prototypes.pow(2).sum(dim=-1), torch.full_like(counts, _ABSENT_LOGIT))
        return {**state["params"], weight_key: 2.0 * prototypes, bias_key: bias}

    def metrics(
        self, ops: TaskOps, meta: Params, state: dict[str, Any], sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor
    ) -> dict[str, Tensor]:
        """Support and query loss and accuracy of the prototype classifier ("pre" = "post": nothing steps)."""
        support_loss = ops.loss(prototype_logits(state["hs"], state["prototypes"], state["counts"]), sy)
        return metric_dict(
            self.kind,
            ops.loss,
            ops.accuracy,
            support_loss_pre=support_loss,
            support_loss_post=support_loss,
            query_pred_pre=state["query_logits"],
            query_pred_post=state["query_logits"],
            query_y=qy,
        )

    # -- adaptation: the prototype head, no steps ----------------------------------------------

    def adapt_with_loss(
        self, meta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool = False
    ) -> tuple[Params, Tensor]:
        """The model with its head set to the prototype classifier of ``(x, y)``; ``steps`` is ignored.

        Returns:
            The adapted parameters and the loss on ``(x, y)`` (before = after: nothing steps).
        """
        params = adaptation_start(meta, first_order=first_order)
        h = self.model.features(params, x)
        head = self.start_head({k: params[k] for k in self.model.head_keys()}, h, y)
        adapted = {**params, **head}
        loss = task_loss(self.kind, self.model.head(adapted, h), y)
        return adapted, loss.detach()

    def adapt_tasks(
        self, meta: Params, x: Tensor, y: Tensor, steps: int, *, first_order: bool = False
    ) -> tuple[Params, Tensor]:
        """:meth:`adapt_with_loss` for ``T`` tasks at once (stacked parameters)."""
        params = adaptation_start(meta, first_order=first_order)
        with torch.set_grad_enabled(not first_order and torch.is_grad_enabled()):
            h = self.model.features_tasks(params, x)
            head = self.start_head({k: params[k] for k in self.model.head_keys()}, h, y)
            adapted = {**params, **head}
            loss = task_losses(self.kind, self.model.head_tasks(adapted, h), y)
        return adapted, loss.detach()

    def adaptation_curve(
        self, meta: Params, sx: Tensor, sy: Tensor, qx: Tensor, qy: Tensor, steps: int
    ) -> dict[str, Tensor]:
        """Query loss and accuracy of the prototype classifier, the same at every one of ``0..steps``."""
        params = {k: v.detach() for k, v in model_part(meta).items()}
        _, state = self.objective(PerTaskOps(self), params, sx, sy, qx, qy)
        logits = state["query_logits"]
        loss = task_loss(self.kind, logits, qy)
        acc = task_accuracy(logits, qy)
        return {"query_loss": loss.expand(steps + 1).clone(), "query_accuracy": acc.expand(steps + 1).clone()}
