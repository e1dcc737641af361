"""Meta-gradients against finite differences (float64) and hand-built references."""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call

from fedmeta.algorithms import ANIL, FOMAML, MAML, MetaSGD, Reptile, build_algorithm
from fedmeta.algorithms.base import task_loss
from fedmeta.errors import ConfigError
from fedmeta.models import MLP
from fedmeta.tasks.regression import SinusoidFamily
from fedmeta.types import TaskBatch
from tests.unit.algorithms.helpers import regression_algorithms

torch.set_default_dtype(torch.float32)


def _setup(cls, *, steps: int = 3, lr: float = 0.05, tasks: int = 4, seed: int = 0):
    model = MLP((1,), (16, 16), 1)
    algo = cls(model, kind="regression", inner_lr=lr, inner_steps=steps)
    meta = {k: v.double() for k, v in algo.init_meta_params(torch.Generator().manual_seed(seed)).items()}
    fam = SinusoidFamily(shots=5, query=7)
    batch = fam.sample(torch.Generator().manual_seed(seed + 1), tasks).to("cpu", torch.float64)
    return model, algo, meta, batch


def _mean_outer_loss(algo: MAML, meta, batch: TaskBatch) -> torch.Tensor:
    losses = [
        algo.outer_loss(meta, batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i])[0]
        for i in range(batch.num_tasks)
    ]
    return torch.stack(losses).mean()


def _directional_fd_check(algo, meta, batch, grad, *, directions: int = 6, eps: float = 1e-6) -> None:
    gen = torch.Generator().manual_seed(123)
    for _ in range(directions):
        v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in meta.items()}
        plus = {k: meta[k] + eps * v[k] for k in meta}
        minus = {k: meta[k] - eps * v[k] for k in meta}
        fd = (_mean_outer_loss(algo, plus, batch) - _mean_outer_loss(algo, minus, batch)) / (2 * eps)
        analytic = sum((grad[k] * v[k]).sum() for k in meta)
        assert float(analytic) == pytest.approx(float(fd), rel=1e-6, abs=1e-8)


@pytest.mark.parametrize("steps", [1, 3])
def test_maml_meta_gradient_matches_finite_differences(steps: int) -> None:
    _, algo, meta, batch = _setup(MAML, steps=steps)
    update = algo.meta_gradient(meta, batch)
    _directional_fd_check(algo, meta, batch, update.gradient)


def test_maml_differs_from_first_order() -> None:
    """The second-order term is really there: exact MAML and FOMAML disagree."""
    _, maml, meta, batch = _setup(MAML, steps=3)
    fo = FOMAML(maml.model, kind="regression", inner_lr=maml.inner_lr, inner_steps=3)
    g2 = maml.meta_gradient(meta, batch).gradient
    g1 = fo.meta_gradient(meta, batch).gradient
    diff = sum(float((g2[k] - g1[k]).norm()) for k in g2)
    assert diff > 1e-3


def test_metasgd_learning_rates_receive_true_gradient() -> None:
    _, algo, meta, batch = _setup(MetaSGD, steps=2)
    assert any(k.startswith("lr.") for k in meta)
    update = algo.meta_gradient(meta, batch)
    # finite differences on the learning rates alone, and on everything together
    _directional_fd_check(algo, meta, batch, update.gradient)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-6
    for key in [k for k in meta if k.startswith("lr.")][:3]:
        v = torch.randn(meta[key].shape, generator=gen, dtype=torch.float64)
        plus = {**meta, key: meta[key] + eps * v}
        minus = {**meta, key: meta[key] - eps * v}
        fd = (_mean_outer_loss(algo, plus, batch) - _mean_outer_loss(algo, minus, batch)) / (2 * eps)
        assert float((update.gradient[key] * v).sum()) == pytest.approx(float(fd), rel=1e-6, abs=1e-9)
        assert float(update.gradient[key].abs().sum()) > 0


def test_anil_meta_gradient_matches_finite_differences_and_reaches_body() -> None:
    _, algo, meta, batch = _setup(ANIL, steps=3)
    update = algo.meta_gradient(meta, batch)
    _directional_fd_check(algo, meta, batch, update.gradient)
    body = [k for k in meta if k.startswith("body.")]
    assert body and all(float(update.gradient[k].abs().sum()) > 0 for k in body)


def _loss(model: MLP, params, x, y):
    return task_loss("regression", functional_call(model.module, params, (x,)), y)


def _hand_sgd(model: MLP, meta, x, y, steps: int, lr: float):
    """Plain autograd SGD with a Python loop: the reference for first-order methods."""
    p = {k: v.detach().clone().requires_grad_(True) for k, v in meta.items()}
    for _ in range(steps):
        grads = torch.autograd.grad(_loss(model, p, x, y), list(p.values()))
        p = {k: (v - lr * g).detach().requires_grad_(True) for (k, v), g in zip(p.items(), grads)}
    return p


def test_fomaml_equals_hand_built_reference() -> None:
    model, algo, meta, batch = _setup(FOMAML, steps=3)
    update = algo.meta_gradient(meta, batch)
    expected = {k: torch.zeros_like(v) for k, v in meta.items()}
    for i in range(batch.num_tasks):
        adapted = _hand_sgd(model, meta, batch.support_x[i], batch.support_y[i], 3, algo.inner_lr)
        grads = torch.autograd.grad(_loss(model, adapted, batch.query_x[i], batch.query_y[i]), list(adapted.values()))
        for k, g in zip(adapted, grads):
            expected[k] += g / batch.num_tasks
    for k in meta:
        torch.testing.assert_close(update.gradient[k], expected[k], rtol=1e-10, atol=1e-12)


def test_reptile_equals_hand_built_reference() -> None:
    model, algo, meta, batch = _setup(Reptile, steps=4)
    update = algo.meta_gradient(meta, batch)
    expected = {k: torch.zeros_like(v) for k, v in meta.items()}
    for i in range(batch.num_tasks):
        adapted = _hand_sgd(model, meta, batch.support_x[i], batch.support_y[i], 4, algo.inner_lr)
        for k in meta:
            expected[k] += (meta[k] - adapted[k].detach()) / batch.num_tasks
    for k in meta:
        torch.testing.assert_close(update.gradient[k], expected[k], rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", regression_algorithms())
def test_vmapped_batch_equals_per_task_loop_and_meta_is_not_mutated(name: str) -> None:
    model = MLP((1,), (16, 16), 1)
    algo = build_algorithm(name, model, kind="regression", inner_lr=0.05, inner_steps=2)
    meta = algo.init_meta_params(torch.Generator().manual_seed(0))
    before = {k: v.clone() for k, v in meta.items()}
    batch = SinusoidFamily(shots=5, query=5).sample(torch.Generator().manual_seed(3), 5)
    grads, metrics = algo.task_updates(meta, batch)
    for i in range(batch.num_tasks):
        g, m = algo.task_update(meta, batch.support_x[i], batch.support_y[i], batch.query_x[i], batch.query_y[i])
        for k in meta:
            torch.testing.assert_close(grads[k][i], g[k], rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(metrics["query_loss_post"][i], m["query_loss_post"], rtol=1e-5, atol=1e-6)
    for k in meta:
        assert torch.equal(meta[k], before[k])


def test_inner_loop_reduces_support_loss() -> None:
    _, algo, meta, batch = _setup(MAML, steps=3, lr=0.01)
    update = algo.meta_gradient(meta, batch)
    assert update.metrics["support_loss_post"] < update.metrics["support_loss_pre"]


def test_unknown_algorithm_is_refused() -> None:
    with pytest.raises(ConfigError, match="meta.algorithm.*'mamll'"):
        build_algorithm("mamll", MLP((1,), (8,), 1), kind="regression", inner_lr=0.1, inner_steps=1)


def test_head_init_is_checked_against_algorithm_and_task_kind() -> None:
    model = MLP((1,), (16, 16), 1)
    with pytest.raises(ConfigError, match="meta.head_init.*only meta.algorithm 'anil'"):
        build_algorithm("maml", model, kind="regression", inner_lr=0.1, inner_steps=1, head_init="zero")
    with pytest.raises(ConfigError, match="meta.head_init.*classification"):
        build_algorithm("anil", model, kind="regression", inner_lr=0.1, inner_steps=1, head_init="prototypes")
    with pytest.raises(ValueError, match="head_init must be one of"):
        ANIL(model, kind="regression", inner_lr=0.1, inner_steps=1, head_init="random")
    zero = build_algorithm("anil", model, kind="regression", inner_lr=0.1, inner_steps=1, head_init="zero")
    assert isinstance(zero, ANIL) and zero.head_init == "zero"
