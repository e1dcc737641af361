"""TRLearner: a task-relation matrix over a meta-batch and a relation-aware consistency term.

Reconstruction of the mechanism of "Rethinking Meta-Learning from a Learning Lens" (arXiv
2409.08474) from its summary: the paper's equations are not available here, so every formula below
is our own choice, written down in ``docs/trlearner.md``. In short, for a meta-batch of ``T`` tasks:

* **Task embedding** ``e_t``: the meta-initialization's body ``h = features(θ, x)`` on task ``t``'s
  support (or support and query) examples; regression: ``concat(mean_n h_n, mean_n h_n y_n)`` (what
  the inputs look like and how the labels load on them); classification: ``mean_n h_n`` (invariant
  to the task's label permutation).
* **Relations** ``M``: ``K`` heads with learnable weights ``ω_k`` (meta-learned with the
  initialization, keys ``term.trlearner.omega``); ``S_ij = (1/K) Σ_k cos(ω_k ⊙ e_i, ω_k ⊙ e_j)``
  (symmetric, in ``[-1, 1]``); ``M_ij = exp(S_ij/τ) / Σ_{l≠i} exp(S_il/τ)`` for ``j ≠ i`` and
  ``M_ii = 0``: rows sum to 1, a negative similarity gets a small but positive weight.
* **Consistency** ``L_TR``, weighted by ``λ`` (``meta.trlearner.weight``), on outputs ``P_j(x)`` of
  task ``j``'s adapted model at task ``i``'s query inputs ``x`` (no query labels are needed for the
  default form):

  - ``agreement`` (default): ``(1/T) Σ_i Σ_j M_ij · mean_x d(P_j(x), P_i(x))``: adapted models of
    related tasks should behave alike where task ``i`` is asked;
  - ``ensemble``: ``(1/T) Σ_i ℓ_i(Σ_j M_ij P_j)``: the relation-weighted ensemble of the *other*
    tasks' adapted models must fit task ``i``'s query set.

  Regression compares outputs (``d`` the squared error, ``ℓ_i`` the MSE). Classification with
  permuted labels compares what does not depend on the label order: the co-assignment matrix
  ``A_j = softmax(P_j) softmax(P_j)ᵀ`` over task ``i``'s query inputs (which inputs a model puts in
  the same class); ``ensemble`` fits ``Σ_j M_ij A_j`` to the same-class matrix of task ``i``'s labels.

The term couples the tasks of a meta-batch (``separable_per_task = False``), so task-level DP
refuses it; within a federated round it couples only one client's own tasks.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from fedmeta.algorithms.engine import OBJECTIVE_TERMS, ObjectiveTerm, TaskOps, TermBatch
from fedmeta.config import Config, TRLearnerConfig
from fedmeta.errors import ConfigError
from fedmeta.models.base import FunctionalModel
from fedmeta.types import TERM_PREFIX, Params, TaskBatch, model_part, term_part

__all__ = [
    "TRLearner",
    "FORMS",
    "EMBEDDINGS",
    "task_embeddings",
    "relation_matrix",
]

#: Readings of the consistency term (the first is the default).
FORMS = ("agreement", "ensemble")
#: Which examples a task's embedding is computed from.
EMBEDDINGS = ("support", "support_query")

_OMEGA = "omega"


def task_embeddings(ops: TaskOps, meta: Params, tasks: TaskBatch, *, embedding: str = "support") -> Tensor:
    """Every task's embedding ``e_t`` from the meta-initialization's body, ``[T, D]``.

    Args:
        ops: batched operations (:class:`~fedmeta.algorithms.engine.BatchedOps`).
        meta: stacked meta-parameters ``[T, *shape]`` (row ``t`` embeds task ``t``, so the gradient
            of ``e_t`` goes to task ``t``'s row).
        tasks: the meta-batch.
        embedding: ``support`` or ``support_query``.

    Returns:
        Regression: ``concat(mean h, mean h ⊗ y)``; classification: ``mean h``.
    """
    params = model_part(meta)
    x, y = tasks.support_x, tasks.support_y
    if embedding == "support_query":
        x, y = torch.cat([x, tasks.query_x], dim=1), torch.cat([y, tasks.query_y], dim=1)
    h = ops.features(params, x)  # [T, N, F]
    if tasks.kind == "classification":
        return h.mean(dim=1)
    yy = y.reshape(*y.shape[:2], -1).to(h.dtype)  # [T, N, O]
    loaded = (h.unsqueeze(-1) * yy.unsqueeze(-2)).mean(dim=1).flatten(1)  # [T, F*O]
    return torch.cat([h.mean(dim=1), loaded], dim=1)


def relation_matrix(embeddings: Tensor, omega: Tensor, *, temperature: float) -> Tensor:
    """TRLearner's task relations ``M`` ``[T, T]``: rows sum to 1, ``M_ii = 0`` (module docstring).

    Args:
        embeddings: ``[T, D]`` task embeddings.
        omega: ``[K, D]`` head weights.
        temperature: ``τ`` of the row softmax.

    Returns:
        ``M``; for a single task, ``[[0]]`` (no other task to relate to).
    """
    tasks = embeddings.shape[0]
    weighted = F.normalize(omega.unsqueeze(1) * embeddings.unsqueeze(0), dim=-1, eps=1e-12)  # [K, T, D]
    similarity = (weighted @ weighted.transpose(1, 2)).mean(dim=0)  # [T, T]
    if tasks == 1:
        return torch.zeros_like(similarity)
    eye = torch.eye(tasks, dtype=torch.bool, device=embeddings.device)
    logits = (similarity / temperature).masked_fill(eye, float("-inf"))
    return torch.softmax(logits, dim=-1)


def _embedding_dim(model: FunctionalModel, kind: str) -> int:
    """``D``: the body's feature size ``F`` (regression: ``F · (1 + outputs)``), read off the head's weight."""
    shapes = [model.param_shapes[k] for k in model.head_keys() if len(model.param_shapes[k]) == 2]
    if not shapes:
        raise ConfigError(
            "meta.regularizer 'trlearner' needs a model whose head is linear (a [outputs, features] weight)"
        )
    outputs, features = shapes[0]
    return features if kind == "classification" else features * (1 + outputs)


@OBJECTIVE_TERMS.register("trlearner")
class TRLearner(ObjectiveTerm):
    """TRLearner's relation-aware consistency ``λ · L_TR`` (module docstring), with its relation heads.

    Args:
        options: ``meta.trlearner``.
        model: the run's model (its head gives the embedding size).
        kind: ``regression`` or ``classification``.
    """

    name: ClassVar[str] = "trlearner"
    separable_per_task: ClassVar[bool] = False

    def __init__(self, options: TRLearnerConfig, *, model: FunctionalModel, kind: str) -> None:
        self.check_options(options)
        self.options = options
        self.kind = kind
        self.dim = _embedding_dim(model, kind)

    @staticmethod
    def check_options(options: TRLearnerConfig) -> None:
        """Refuse bad ``meta.trlearner`` options.

        Raises:
            ConfigError: naming the ``meta.trlearner`` key and the bad value.
        """
        if options.heads < 1:
            raise ConfigError(f"config key 'meta.trlearner.heads' must be at least 1, got {options.heads}")
        if not (options.weight >= 0 and math.isfinite(options.weight)):
            raise ConfigError(f"config key 'meta.trlearner.weight' must be a number >= 0, got {options.weight}")
        if not (options.temperature > 0 and math.isfinite(options.temperature)):
            raise ConfigError(
                f"config key 'meta.trlearner.temperature' must be a positive number, got {options.temperature}"
            )
        if options.form not in FORMS:
            raise ConfigError(
                f"config key 'meta.trlearner.form' must be one of {', '.join(FORMS)}, got {options.form!r}"
            )
        if options.embedding not in EMBEDDINGS:
            raise ConfigError(
                f"config key 'meta.trlearner.embedding' must be one of {', '.join(EMBEDDINGS)}, "
                f"got {options.embedding!r}"
            )

    @classmethod
    def from_config(cls, cfg: Config, *, model: FunctionalModel, kind: str) -> TRLearner:
        """TRLearner with ``meta.trlearner``'s options."""
        return cls(cfg.meta.trlearner, model=model, kind=kind)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``meta.trlearner``'s options, and at least two tasks per client to relate.

        Raises:
            ConfigError: naming the key.
        """
        cls.check_options(cfg.meta.trlearner)
        if cfg.meta.tasks_per_client < 2:
            raise ConfigError(
                "config key 'meta.tasks_per_client' must be at least 2 with meta.regularizer 'trlearner' "
                f"(it relates the tasks of a client's meta-batch), got {cfg.meta.tasks_per_client}"
            )

    @property
    def vanishes(self) -> bool:
        """``weight: 0``: the run is the base algorithm's, bit for bit (no relation heads either)."""
        return self.options.weight == 0

    @property
    def omega_key(self) -> str:
        """The meta-parameter key of the head weights ``ω``."""
        return f"{TERM_PREFIX}{self.name}.{_OMEGA}"

    def init_params(self, meta: Params, gen: torch.Generator) -> Params:
        """``ω``: ``K`` heads of ones plus ``N(0, 0.1²)`` (distinct heads, starting near plain cosine)."""
        dtype = next(iter(meta.values())).dtype
        noise = torch.randn(self.options.heads, self.dim, generator=gen, dtype=torch.float64)
        return {self.omega_key: (1.0 + 0.1 * noise).to(dtype)}

    def relations(self, batch: TermBatch) -> Tensor:
        """``M`` of the meta-batch, ``[T, T]``."""
        assert batch.ops is not None, "TRLearner evaluates models: it needs the batch's operations"
        omega = term_part(batch.meta, self.name)[_OMEGA].mean(dim=0)  # rows equal in value; gradient shared
        emb = task_embeddings(batch.ops, batch.meta, batch.tasks, embedding=self.options.embedding)
        return relation_matrix(emb, omega, temperature=self.options.temperature)

    def cross_outputs(self, batch: TermBatch) -> Tensor:
        """``P[j, i]``: task ``j``'s adapted model at task ``i``'s query inputs, ``[T, T, Nq, out]``.

        Each pair is its own forward pass over task ``i``'s query set alone (as ``T²`` stacked
        tasks), so a model whose outputs depend on the batch (batch normalization) sees the same
        batch as when task ``i`` is evaluated.
        """
        assert batch.ops is not None
        qx = batch.tasks.query_x
        tasks = qx.shape[0]
        params = {
            k: v.unsqueeze(1).expand(tasks, tasks, *v.shape[1:]).reshape(tasks * tasks, *v.shape[1:])
            for k, v in model_part(batch.adapted).items()
        }
        inputs = qx.unsqueeze(0).expand(tasks, *qx.shape).reshape(tasks * tasks, *qx.shape[1:])
        out = batch.ops.forward(params, inputs)  # row j*T + i: model j on task i's queries
        return out.reshape(tasks, tasks, qx.shape[1], -1)

    def loss(self, batch: TermBatch) -> Tensor:
        """``λ · L_TR``; exactly 0 (and no graph through it) for one task or ``λ = 0``."""
        tasks = batch.tasks.num_tasks
        if self.options.weight == 0 or tasks < 2:
            return torch.zeros((), dtype=batch.tasks.query_x.dtype)
        m = self.relations(batch)
        outputs = self.cross_outputs(batch)
        if batch.tasks.kind == "classification":
            prob = torch.softmax(outputs, dim=-1)
            outputs = prob @ prob.transpose(-1, -2)  # co-assignment [T, T, Nq, Nq]
        own = outputs.diagonal(dim1=0, dim2=1).movedim(-1, 0)  # P[i, i] -> [T, ...]
        if self.options.form == "agreement":
            gap = (outputs - own.unsqueeze(0)).pow(2).flatten(2).mean(dim=-1)  # [T(j), T(i)]
            value = (m * gap.transpose(0, 1)).sum(dim=1).mean()
        else:
            ensemble = torch.einsum("ij,ji...->i...", m, outputs)
            if batch.tasks.kind == "classification":
                qy = batch.tasks.query_y
                target = (qy.unsqueeze(-1) == qy.unsqueeze(-2)).to(ensemble.dtype)
            else:
                target = batch.tasks.query_y.reshape(ensemble.shape).to(ensemble.dtype)
            value = (ensemble - target).pow(2).flatten(1).mean(dim=-1).mean()
        return self.options.weight * value
