"""TRLearner (issue 18): the relation matrix as defined, its consistency term against an independent
loop-by-loop implementation (finite differences in float64 for the algorithms whose update is a
gradient, a hand-built first-order reference for FOMAML and Reptile), ``weight: 0`` as the base
algorithm bit for bit, and the combinations it refuses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from fedmeta.algorithms import ANIL, FOMAML, MAML, MetaSGD, ProtoNet, Reptile
from fedmeta.algorithms.base import MetaAlgorithm
from fedmeta.algorithms.engine import PerTaskOps
from fedmeta.algorithms.trlearner import TRLearner, relation_matrix
from fedmeta.config import TRLearnerConfig, config_from_dict
from fedmeta.errors import ConfigError
from fedmeta.models import MLP
from fedmeta.models.conv4 import Conv4
from fedmeta.types import TaskBatch, model_part

TASKS = 4
WAYS = 3
SHAPE = (1, 12, 12)
OMEGA = "term.trlearner.omega"


def _regression(cls: type[MetaAlgorithm]) -> tuple[MetaAlgorithm, dict[str, torch.Tensor], TaskBatch]:
    model = MLP((1,), (10, 10), 1)
    algo = cls(model, kind="regression", inner_lr=0.05, inner_steps=2)
    gen = torch.Generator().manual_seed(3)
    meta = {k: v.double() for k, v in algo.init_meta_params(gen).items()}
    gen = torch.Generator().manual_seed(1)
    sx = torch.rand(TASKS, 5, 1, generator=gen, dtype=torch.float64) * 10 - 5
    qx = torch.rand(TASKS, 7, 1, generator=gen, dtype=torch.float64) * 10 - 5
    amp = torch.rand(TASKS, 1, 1, generator=gen, dtype=torch.float64) * 4 + 1
    return algo, meta, TaskBatch(sx, amp * torch.sin(sx), qx, amp * torch.sin(qx), "regression")


def _classification(cls: type[MetaAlgorithm]) -> tuple[MetaAlgorithm, dict[str, torch.Tensor], TaskBatch]:
    model = Conv4(SHAPE, WAYS, channels=4)
    algo = cls(model, kind="classification", inner_lr=0.3, inner_steps=1)
    gen = torch.Generator().manual_seed(3)
    meta = {
        k: v.double() + 0.05 * torch.randn(v.shape, generator=gen, dtype=torch.float64)
        for k, v in algo.init_meta_params(gen).items()
    }
    gen = torch.Generator().manual_seed(1)
    sx = torch.rand(TASKS, 6, *SHAPE, generator=gen, dtype=torch.float64)
    qx = torch.rand(TASKS, 6, *SHAPE, generator=gen, dtype=torch.float64)
    sy = torch.arange(6).remainder(WAYS).expand(TASKS, -1).clone()
    qy = torch.randint(0, WAYS, (TASKS, 6), generator=gen)
    return algo, meta, TaskBatch(sx, sy, qx, qy, "classification")


def _with_term(
    algo: MetaAlgorithm, meta: dict[str, torch.Tensor], options: TRLearnerConfig
) -> tuple[TRLearner, dict[str, torch.Tensor]]:
    term = TRLearner(options, model=algo.model, kind=algo.kind)
    algo.with_terms(term)
    omega = term.init_params(meta, torch.Generator().manual_seed(9))
    return term, {**meta, **omega}


# -- an independent implementation, task by task and pair by pair ---------------------------------


def _embedding(
    model: object, meta: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor, kind: str
) -> torch.Tensor:
    h = model.features(model_part(meta), x)  # type: ignore[attr-defined]
    if kind == "classification":
        return h.mean(dim=0)
    parts = [h.mean(dim=0)]
    loaded = torch.stack([(h[:, f : f + 1] * y).mean(dim=0) for f in range(h.shape[1])])  # [F, O]
    return torch.cat([*parts, loaded.flatten()])


def _cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return (a * b).sum() / (a.norm() * b.norm())


def _similarity(emb: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``S_ij``: the heads' mean cosine similarity of ω-weighted embeddings, pair by pair."""
    n = emb.shape[0]
    return torch.stack([
        torch.stack([
            torch.stack([_cosine(w * emb[i], w * emb[j]) for w in omega]).mean()
            for j in range(n)
        ])
        for i in range(n)
    ])


def _relations(emb: list[torch.Tensor], omega: torch.Tensor, tau: float) -> torch.Tensor:
    n = len(emb)
    sim = torch.zeros(n, n, dtype=omega.dtype)
    for i in range(n):
        for j in range(n):
            total = torch.zeros((), dtype=omega.dtype)
            for w in omega:
                total = total + _cosine(w * emb[i], w * emb[j])
            sim[i, j] = total / omega.shape[0]
    rows = []
    for i in range(n):
        others = [torch.exp(sim[i, j] / tau) for j in range(n) if j != i]
        denom = sum(others)
        rows.append(torch.stack([torch.zeros((), dtype=omega.dtype) if j == i else torch.exp(sim[i, j] / tau) / denom
                                 for j in range(n)]))
    return torch.stack(rows)


def _compare(model: object, adapted: dict[str, torch.Tensor], x: torch.Tensor, kind: str) -> torch.Tensor:
    out = model.forward(adapted, x)  # type: ignore[attr-defined]
    if kind == "classification":
        p = torch.softmax(out, dim=-1)
        return p @ p.T
    return out


def _reference_term(
    algo: MetaAlgorithm, meta: dict[str, torch.Tensor], adapted: list[dict[str, torch.Tensor]], tasks: TaskBatch,
    options: TRLearnerConfig,
) -> torch.Tensor:
    """``λ L_TR`` written from docs/trlearner.md's formulas with explicit loops."""
    kind, n = tasks.kind, tasks.num_tasks
    emb = [_embedding(algo.model, meta, tasks.support_x[t], tasks.support_y[t], kind) for t in range(n)]
    m = _relations(emb, meta[OMEGA], options.temperature)
    total = torch.zeros((), dtype=torch.float64)
    for i in range(n):
        qx = tasks.query_x[i]
        outs = [_compare(algo.model, model_part(adapted[j]), qx, kind) for j in range(n)]
        if options.form == "agreement":
            total = total + sum(m[i, j] * (outs[j] - outs[i]).pow(2).mean() for j in range(n) if j != i)
        else:
            ensemble = sum(m[i, j] * outs[j] for j in range(n) if j != i)
            qy = tasks.query_y[i]
            target = (qy[:, None] == qy[None, :]).double() if kind == "classification" else qy
            total = total + (ensemble - target).pow(2).mean()
    return options.weight * total / n


def _reference_objective(
    algo: MetaAlgorithm, meta: dict[str, torch.Tensor], tasks: TaskBatch, options: TRLearnerConfig
) -> torch.Tensor:
    """``mean_t L_t(θ) + λ L_TR(θ)``: the base objective task by task plus the loop-built term."""
    ops = PerTaskOps(algo)
    losses, adapted = [], []
    for t in range(tasks.num_tasks):
        loss, state = algo.objective(
            ops, meta, tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
        )
        losses.append(loss)
        adapted.append(algo.adapted_model(state))
    return torch.stack(losses).mean() + _reference_term(algo, meta, adapted, tasks, options)


# -- tests -----------------------------------------------------------------------------------------


def test_relation_matrix_is_as_defined() -> None:
    """Similarities symmetric before normalization; rows sum to 1 with a zero diagonal; equal to the loops."""
    gen = torch.Generator().manual_seed(0)
    emb = torch.randn(5, 6, generator=gen, dtype=torch.float64)
    omega = torch.randn(3, 6, generator=gen, dtype=torch.float64)
    m = relation_matrix(emb, omega, temperature=0.3)
    assert torch.allclose(m, _relations(list(emb), omega, 0.3), atol=1e-12)
    assert torch.allclose(m.sum(dim=1), torch.ones(5, dtype=torch.float64), atol=1e-12)
    assert torch.all(m.diagonal() == 0) and torch.all(m >= 0)
    # the similarity is symmetric before normalization: log M_ij - log M_ji = log Z_j - log Z_i
    # (Z_i the normalizer of row i), so the antisymmetric part of log M has rank 2
    off = ~torch.eye(5, dtype=torch.bool)
    logm = torch.where(off, m.log(), torch.zeros_like(m))
    z = torch.logsumexp(torch.where(off, logm * 0 + _similarity(emb, omega) / 0.3, torch.full_like(m, -torch.inf)), 1)
    assert torch.allclose(torch.where(off, logm - logm.T, 0), torch.where(off, z[None, :] - z[:, None], 0), atol=1e-9)
    # a more similar pair gets more weight in a row
    close = torch.stack([torch.ones(6), torch.ones(6) + 0.01, -torch.ones(6)]).double()
    m = relation_matrix(close, torch.ones(1, 6, dtype=torch.float64), temperature=0.1)
    assert m[0, 1] > 0.99 and m[0, 2] < 0.01 and m[2, 0] == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("cls", "setup", "form"),
    [
        (MAML, _regression, "agreement"),
        (MAML, _regression, "ensemble"),
        (MetaSGD, _regression, "agreement"),
        (ANIL, _classification, "agreement"),
        (ProtoNet, _classification, "agreement"),
        (ProtoNet, _classification, "ensemble"),
    ],
)
def test_meta_gradient_with_the_term_matches_finite_differences(cls: type[MetaAlgorithm], setup: object,
                                                                 form: str) -> None:
    """The mean of the engine's rows is the gradient of the loop-built ``mean_t L_t + λ L_TR``
    (central differences along random directions, float64), relation heads included."""
    algo, meta, tasks = setup(cls)  # type: ignore[operator]
    options = TRLearnerConfig(heads=3, weight=0.7, form=form, temperature=0.5)
    _, meta = _with_term(algo, meta, options)
    rows, _ = algo.task_updates(meta, tasks)
    mean = {k: v.mean(dim=0) for k, v in rows.items()}
    assert float(mean[OMEGA].abs().max()) > 0
    gen = torch.Generator().manual_seed(5)
    eps = 1e-6
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in meta.items()}
        plus = _reference_objective(algo, {k: meta[k] + eps * v[k] for k in meta}, tasks, options)
        minus = _reference_objective(algo, {k: meta[k] - eps * v[k] for k in meta}, tasks, options)
        numeric = float((plus - minus) / (2 * eps))
        analytic = float(sum((mean[k] * v[k]).sum() for k in meta))
        assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


@pytest.mark.parametrize("cls", [FOMAML, Reptile])
def test_first_order_updates_with_the_term_match_a_hand_built_reference(cls: type[MetaAlgorithm]) -> None:
    """FOMAML / Reptile: the base update on the detached adapted models plus the term's gradient with
    respect to those models and to what it reads of θ directly (relation heads, embeddings)."""
    algo, meta, tasks = _regression(cls)
    options = TRLearnerConfig(heads=2, weight=0.5, temperature=0.5)
    _, meta = _with_term(algo, meta, options)
    rows, _ = algo.task_updates(meta, tasks)
    mean = {k: v.mean(dim=0) for k, v in rows.items()}

    n = tasks.num_tasks
    base = MAML(algo.model, kind="regression", inner_lr=algo.inner_lr, inner_steps=algo.inner_steps)
    adapted = [
        {k: v.detach().requires_grad_(True) for k, v in base.adapt(
            model_part(meta), tasks.support_x[t], tasks.support_y[t], algo.inner_steps, first_order=True
        ).items()}
        for t in range(n)
    ]
    theta = {k: v.clone().requires_grad_(True) for k, v in meta.items()}
    term = _reference_term(algo, theta, adapted, tasks, options)
    leaves = [a[k] for a in adapted for k in sorted(a)] + [theta[k] for k in sorted(theta)]
    grads = torch.autograd.grad(term, leaves, allow_unused=True)
    per_adapted = len(sorted(adapted[0]))
    want: dict[str, torch.Tensor] = {k: torch.zeros_like(v) for k, v in meta.items()}
    for t in range(n):
        for i, k in enumerate(sorted(adapted[t])):
            g = grads[t * per_adapted + i]
            want[k] = want[k] + g  # Σ_t ∇_{φ_t} R
            if cls is FOMAML:
                q = F.mse_loss(algo.model.forward(adapted[t], tasks.query_x[t]), tasks.query_y[t])
                want[k] = want[k] + torch.autograd.grad(q, adapted[t][k])[0] / n
            else:
                want[k] = want[k] + (meta[k] - adapted[t][k].detach()) / n
    for i, k in enumerate(sorted(theta)):
        g = grads[n * per_adapted + i]
        if g is not None:
            want[k] = want[k] + g  # ∇_θ R with the adapted models held fixed
    for k in meta:
        assert torch.allclose(mean[k], want[k], rtol=1e-9, atol=1e-12), k


def _run(tmp_path: Path, name: str, overrides: dict[str, object]) -> list[dict[str, object]]:
    from fedmeta.centralized import run_centralized

    meta = {"algorithm": "maml", "tasks_per_client": 3, **overrides}
    cfg = config_from_dict({
        "task": {"name": "sinusoid"},
        "meta": meta,
        "federation": {"clients_total": 6, "clients_per_round": 3, "rounds": 3},
        "eval": {"tasks": 8, "every": 3, "steps": 2},
    })
    run_centralized(cfg, tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    for row in rows:  # wall-clock times are not results
        row.pop("timing", None)
        row.pop("seconds", None)
    return rows


def test_weight_zero_is_the_base_algorithm_bit_for_bit_and_the_heads_are_checkpointed(tmp_path: Path) -> None:
    plain = _run(tmp_path, "plain", {})
    zero = _run(tmp_path, "zero", {"regularizer": "trlearner", "trlearner": {"weight": 0.0}})
    assert plain == zero
    with_term = _run(tmp_path, "term", {"regularizer": "trlearner", "trlearner": {"weight": 1.0}})
    assert with_term != plain
    state = torch.load(tmp_path / "term" / "checkpoint.pt", weights_only=False)
    features = state["meta_params"]["head.weight"].shape[1]
    assert state["meta_params"][OMEGA].shape == (4, 2 * features)  # K heads over concat(mean h, mean h·y)


@pytest.mark.parametrize(
    ("meta", "privacy", "match"),
    [
        ({"algorithm": "fedavg"}, {}, "meta.regularizer.*needs an algorithm that adapts"),
        ({"local_steps": 2}, {}, "meta.regularizer.*several local meta-steps"),
        ({"tasks_per_client": 1}, {}, "meta.tasks_per_client.*at least 2"),
        ({"trlearner": {"form": "both"}}, {}, "meta.trlearner.form"),
        ({"trlearner": {"heads": 0}}, {}, "meta.trlearner.heads"),
        ({"trlearner": {"temperature": 0.0}}, {}, "meta.trlearner.temperature"),
        ({"trlearner": {"embedding": "query"}}, {}, "meta.trlearner.embedding"),
        ({}, {"mode": "task"}, "'trlearner' couples the tasks.*privacy.mode 'task'"),
    ],
)
def test_combinations_it_cannot_serve_are_refused_naming_the_key(
    meta: dict[str, object], privacy: dict[str, object], match: str
) -> None:
    data: dict[str, object] = {
        "task": {"name": "sinusoid"},
        "meta": {"tasks_per_client": 4, "regularizer": "trlearner", **meta},
    }
    if privacy:
        data["privacy"] = privacy
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)
