"""The meta-gradient engine: objective terms on whole meta-batches against finite differences (float64),
the per-task and batched paths agreeing with terms, and the rules terms must follow."""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch

from fedmeta.algorithms import ANIL, FOMAML, MAML, FedAvg, ProtoNet
from fedmeta.algorithms.base import MetaAlgorithm
from fedmeta.algorithms.engine import ObjectiveTerm, TermBatch, require_separable
from fedmeta.errors import ConfigError
from fedmeta.models import MLP
from fedmeta.models.conv4 import Conv4
from fedmeta.types import TaskBatch, model_part

SHAPE = (1, 20, 20)
WAYS = 3


class AdaptedDrift(ObjectiveTerm):
    """An example term: ``λ Σ_t ||φ_t − θ_t||²``, an L2 penalty on how far adaptation moves each task's model."""

    name: ClassVar[str] = "adapted-drift"
    separable_per_task: ClassVar[bool] = True

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def loss(self, batch: TermBatch) -> torch.Tensor:
        meta = model_part(batch.meta)
        return self.weight * sum((batch.adapted[k] - meta[k]).pow(2).sum() for k in meta)


class AdaptedSpread(ObjectiveTerm):
    """A term coupling the tasks: the spread of the adapted models around their mean (not separable)."""

    name: ClassVar[str] = "adapted-spread"
    separable_per_task: ClassVar[bool] = False

    def loss(self, batch: TermBatch) -> torch.Tensor:
        return 0.1 * sum((v - v.mean(dim=0, keepdim=True)).pow(2).sum() for v in batch.adapted.values())


def _setup(
    cls: type[MetaAlgorithm], *, batched: bool = True, **kw: object
) -> tuple[MetaAlgorithm, dict[str, torch.Tensor], TaskBatch]:
    model = Conv4(SHAPE, WAYS, channels=8, batched_tasks=batched)
    algo = cls(model, kind="classification", inner_lr=0.3, inner_steps=2, **kw)  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(3)
    meta = {
        k: v.double() + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
        for k, v in algo.init_meta_params(gen).items()
    }
    gen = torch.Generator().manual_seed(1)
    sx = torch.rand(3, 6, *SHAPE, generator=gen, dtype=torch.float64)
    qx = torch.rand(3, 9, *SHAPE, generator=gen, dtype=torch.float64)
    sy = torch.arange(6).remainder(WAYS).expand(3, -1).clone()
    qy = torch.randint(0, WAYS, (3, 9), generator=gen)
    return algo, meta, TaskBatch(sx, sy, qx, qy, "classification")


def _setup_mlp(cls: type[MetaAlgorithm]) -> tuple[MetaAlgorithm, dict[str, torch.Tensor], TaskBatch]:
    model = MLP((5,), (12,), WAYS)
    algo = cls(model, kind="classification", inner_lr=0.3, inner_steps=2)
    meta = {k: v.double() for k, v in algo.init_meta_params(torch.Generator().manual_seed(3)).items()}
    gen = torch.Generator().manual_seed(1)
    sx, qx = (
        torch.randn(3, 6, 5, generator=gen, dtype=torch.float64),
        torch.randn(3, 9, 5, generator=gen, dtype=torch.float64),
    )
    sy, qy = torch.arange(6).remainder(WAYS).expand(3, -1).clone(), torch.randint(0, WAYS, (3, 9), generator=gen)
    return algo, meta, TaskBatch(sx, sy, qx, qy, "classification")


def _batch_objective(
    algo: MetaAlgorithm, meta: dict[str, torch.Tensor], tasks: TaskBatch, terms: tuple[ObjectiveTerm, ...]
) -> torch.Tensor:
    """``mean_t L_t(θ) + R(θ)``, computed task by task (the reference the engine's rows must average to)."""
    losses, adapted = [], []
    from fedmeta.algorithms.engine import PerTaskOps

    ops = PerTaskOps(algo)
    for t in range(tasks.num_tasks):
        loss, state = algo.objective(
            ops, meta, tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
        )
        losses.append(loss)
        adapted.append(algo.adapted_model(state))
    stacked_meta = {k: v.unsqueeze(0).expand(tasks.num_tasks, *v.shape) for k, v in meta.items()}
    stacked_adapted = {k: torch.stack([a[k] for a in adapted]) for k in adapted[0]}
    return torch.stack(losses).mean() + sum(
        term.loss(TermBatch(stacked_meta, stacked_adapted, tasks)) for term in terms
    )


@pytest.mark.parametrize("native", [True, False], ids=["conv4", "mlp"])
@pytest.mark.parametrize("cls", [MAML, ANIL, ProtoNet])
@pytest.mark.parametrize("term", [AdaptedDrift(0.7), AdaptedSpread()], ids=["separable", "coupled"])
def test_terms_enter_the_meta_gradient(cls: type[MetaAlgorithm], term: ObjectiveTerm, native: bool) -> None:
    """With a term, the mean of the per-task rows is the gradient of ``mean_t L_t + R`` (central
    differences), for a model with a native multi-task pass (Conv-4) and one without (the MLP)."""
    algo, meta, tasks = _setup(cls) if native else _setup_mlp(cls)
    algo.with_terms(term)
    rows, _ = algo.task_updates(meta, tasks)
    vmapped, _ = algo.vmapped_task_updates(meta, tasks)  # terms always take the batched eager path
    assert all(torch.equal(rows[k], vmapped[k]) for k in meta)
    mean = {k: v.mean(dim=0) for k, v in rows.items()}
    gen = torch.Generator().manual_seed(5)
    eps = 1e-7
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in meta.items()}
        plus = _batch_objective(algo, {k: meta[k] + eps * v[k] for k in meta}, tasks, (term,))
        minus = _batch_objective(algo, {k: meta[k] - eps * v[k] for k in meta}, tasks, (term,))
        numeric = float((plus - minus) / (2 * eps))
        analytic = float(sum((mean[k] * v[k]).sum() for k in meta))
        assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def test_a_term_changes_the_update_and_no_term_changes_nothing() -> None:
    algo, meta, tasks = _setup(MAML)
    plain, metrics = algo.task_updates(meta, tasks)
    again, _ = (
        MAML(algo.model, kind="classification", inner_lr=0.3, inner_steps=2).with_terms().task_updates(meta, tasks)
    )
    assert all(torch.equal(plain[k], again[k]) for k in meta)
    penalized, penalized_metrics = algo.with_terms(AdaptedDrift(10.0)).task_updates(meta, tasks)
    assert max(float((penalized[k] - plain[k]).abs().max()) for k in meta) > 1e-4
    # the metrics describe the tasks, not the penalty
    assert all(torch.equal(metrics[k], penalized_metrics[k]) for k in metrics)


def test_terms_need_an_algorithm_that_adapts_and_coupled_terms_are_named() -> None:
    """FOMAML and Reptile take terms first-order (tests/unit/algorithms/test_trlearner.py); FedAvg does not adapt."""
    algo, _, _ = _setup(FedAvg)
    with pytest.raises(ValueError, match="objective terms need an algorithm that adapts; 'fedavg' has 'pooled'"):
        algo.with_terms(AdaptedDrift(1.0))
    _setup(FOMAML)[0].with_terms(AdaptedDrift(1.0))
    require_separable((AdaptedDrift(1.0),), why="task-level DP clips each task's update")
    with pytest.raises(ConfigError, match="'adapted-spread' couples the tasks.*task-level DP"):
        require_separable((AdaptedDrift(1.0), AdaptedSpread()), why="task-level DP clips each task's update")


def test_task_level_dp_and_local_steps_refuse_what_they_cannot_serve(tmp_path: object) -> None:
    """Task-level DP clips each task on its own: a coupling term is refused there, naming the term;
    several local meta-steps (vmapped over clients) do not take terms yet."""
    from fedmeta.config import config_from_dict
    from fedmeta.experiment import Experiment
    from fedmeta.local_update import local_meta_updates
    from fedmeta.privacy.client_update import private_task_update

    cfg = config_from_dict({"task": {"name": "sinusoid"}, "meta": {"algorithm": "maml"}})
    exp = Experiment(cfg)
    exp.algorithm.with_terms(AdaptedSpread())
    with pytest.raises(ConfigError, match="'adapted-spread' couples the tasks.*privacy.mode 'task'"):
        private_task_update(exp, exp.initial_meta_params(), 1, 0, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="objective terms are not supported with several local meta-steps"):
        local_meta_updates(exp.algorithm, exp.initial_meta_params(), [[exp.source.client_tasks(1, 0)]], lr=0.1)
