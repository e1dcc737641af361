"""Meta-SGD (Li, Zhou, Chen & Li, 2017): MAML with learned per-parameter inner learning rates."""

from __future__ import annotations

from typing import ClassVar

import torch

from fedmeta.algorithms.base import ALGORITHMS
from fedmeta.algorithms.maml import MAML
from fedmeta.types import LR_PREFIX, Params, StepSizes, lr_part, model_part

__all__ = ["MetaSGD"]


@ALGORITHMS.register("metasgd")
class MetaSGD(MAML):
    """The inner update is ``θ - α ⊙ ∇L_support(θ)`` with ``α`` a learned tensor per parameter.

    ``α`` lives in the meta-parameter dict under ``lr.<name>``, starts at ``inner_lr`` and is
    meta-learned jointly with ``θ`` through the exact second-order meta-gradient (the same
    computation as MAML, whose step size simply becomes a differentiable input).

    The learned rates are tuned for exactly ``inner_steps`` steps and grow large (that is how
    Meta-SGD adapts in one step); taking many more steps at test time with them can diverge, so
    evaluate with ``eval.steps`` equal to ``meta.inner_steps`` (the 1-step metrics are always
    reported as ``post_adapt_loss_1step``).
    """

    name: ClassVar[str] = "metasgd"

    def init_meta_params(self, gen: torch.Generator) -> Params:
        params = self.model.init_params(gen)
        rates = {f"{LR_PREFIX}{k}": torch.full_like(v, self.inner_lr) for k, v in params.items()}
        return {**params, **rates}

    def adapted_keys(self, meta: Params) -> list[str]:
        return list(model_part(meta))

    def step_sizes(self, meta: Params) -> StepSizes:
        rates = lr_part(meta)
        missing = [k for k in self.adapted_keys(meta) if k not in rates]
        if missing:
            raise ValueError(f"Meta-SGD meta-parameters lack learning rates for {missing}")
        return dict(rates)
