"""The batched eager path (one pass for all tasks) against the vmap path and finite differences.

Conv-4 runs all tasks of a meta-batch in one grouped pass (``Conv4.forward_tasks``) and the
algorithms differentiate it with plain autograd (``batched_task_updates``); the vmap path
(``vmapped_task_updates``, nested ``torch.func.grad``) is the reference. Everything in float64,
where the two agree to rounding (≈1e-15 relative); the tolerances below leave room for
summation order only.
"""

from __future__ import annotations

import pytest
import torch
from torch.func import functional_call, vmap

from fedmeta.algorithms import ALGORITHMS, ANIL, MAML, MetaSGD
from fedmeta.algorithms.base import MetaAlgorithm
from fedmeta.models import MLP
from fedmeta.models.conv4 import NORMS, Conv4
from fedmeta.types import TaskBatch
from tests.unit.algorithms.helpers import image_tasks, perturbed, regression_algorithms

SHAPE = (1, 20, 20)  # 2x2 maps after four stride-2 blocks: group statistics stay well conditioned
WAYS = 3


def _assert_matches_finite_differences(
    algo: MetaAlgorithm, meta: dict[str, torch.Tensor], tasks: TaskBatch, grads: dict[str, torch.Tensor]
) -> None:
    """Each task's batched meta-gradient, along a random direction, equals a central difference of its outer loss.

    In float64.
    """
    gen = torch.Generator().manual_seed(7)
    direction = {k: torch.randn(v.shape, generator=gen, dtype=torch.float64) for k, v in meta.items()}
    eps = 1e-7  # tiny: the loss is only piecewise smooth (ReLU kinks)
    for t in range(tasks.num_tasks):
        args = (tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t])
        plus = algo.outer_loss({k: v + eps * direction[k] for k, v in meta.items()}, *args)[0]
        minus = algo.outer_loss({k: v - eps * direction[k] for k, v in meta.items()}, *args)[0]
        numeric = float((plus - minus) / (2 * eps))
        analytic = float(sum((grads[k][t] * direction[k]).sum() for k in meta))
        assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def _conv4(norm: str = "batch", pool: str = "stride", batched: bool = True) -> Conv4:
    return Conv4(SHAPE, WAYS, channels=16 if norm == "group" else 8, norm=norm, pool=pool, batched_tasks=batched)


def _params(model: Conv4 | MLP, algo: MetaAlgorithm | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return perturbed(algo.init_meta_params(gen) if algo is not None else model.init_params(gen), gen)


def _images(tasks: int = 3, support: int = 6, query: int = 9, seed: int = 1) -> TaskBatch:
    return image_tasks(SHAPE, WAYS, tasks=tasks, support=support, query=query, seed=seed)


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], rtol: float = 1e-10) -> None:
    assert set(a) == set(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        scale = max(float(b[k].abs().max()), 1e-12)
        assert float((a[k] - b[k]).abs().max()) <= rtol * scale, (k, float((a[k] - b[k]).abs().max()), scale)


@pytest.mark.parametrize(("norm", "pool"), [(n, "stride") for n in NORMS] + [("batch", "max")])
def test_hand_written_forward_is_the_module(norm: str, pool: str) -> None:
    """Conv4.forward (torch.nn.functional on the dict) computes what the nn.Module skeleton does."""
    model = _conv4(norm, pool)
    params = _params(model)
    x = torch.rand(5, *SHAPE, dtype=torch.float64)
    reference = functional_call(model.module.double(), params, (x,))
    torch.testing.assert_close(model.forward(params, x), reference, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize(("norm", "pool"), [(n, "stride") for n in NORMS] + [("batch", "max")])
def test_forward_tasks_is_each_task_on_its_own(norm: str, pool: str) -> None:
    """Folding tasks into channels changes nothing: row t is task t's single-task forward pass."""
    model = _conv4(norm, pool)
    stacked = {k: torch.stack([v, 1.1 * v + 0.01, 0.9 * v]) for k, v in _params(model).items()}
    x = torch.rand(3, 4, *SHAPE, dtype=torch.float64)
    out = model.forward_tasks(stacked, x)
    feats = model.features_tasks(stacked, x)
    assert out.shape == (3, 4, WAYS) and feats.shape == (3, 4, model.channels)
    for t in range(3):
        one = {k: v[t] for k, v in stacked.items()}
        torch.testing.assert_close(out[t], model.forward(one, x[t]), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(feats[t], model.features(one, x[t]), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(model.head_tasks(stacked, feats), out, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(ALGORITHMS))
@pytest.mark.parametrize("steps", [1, 2])
def test_batched_updates_equal_vmapped_updates_on_conv4(name: str, steps: int) -> None:
    model = _conv4()
    algo = ALGORITHMS.get(name)(model, kind="classification", inner_lr=0.3, inner_steps=steps)
    meta = _params(model, algo)
    before = {k: v.clone() for k, v in meta.items()}
    tasks = _images()
    g_batched, m_batched = algo.batched_task_updates(meta, tasks)
    g_vmap, m_vmap = algo.vmapped_task_updates(meta, tasks)
    _close(g_batched, g_vmap)
    _close(m_batched, m_vmap)
    assert all(torch.equal(meta[k], before[k]) and not meta[k].requires_grad for k in meta), (
        "meta-parameters must not change"
    )
    assert not any(v.requires_grad for v in g_batched.values())
    # the dispatch: Conv-4 takes the batched path unless told not to
    g_default, _ = algo.task_updates(meta, tasks)
    assert all(torch.equal(g_default[k], g_batched[k]) for k in meta)
    slow = ALGORITHMS.get(name)(_conv4(batched=False), kind="classification", inner_lr=0.3, inner_steps=steps)
    g_slow, _ = slow.task_updates(meta, tasks)
    assert all(torch.equal(g_slow[k], g_vmap[k]) for k in meta)


@pytest.mark.parametrize("norm", ["group", "layer", "none"])
@pytest.mark.parametrize("cls", [MAML, ANIL])
def test_batched_second_order_gradients_for_every_norm(norm: str, cls: type[MAML]) -> None:
    model = _conv4(norm)
    algo = cls(model, kind="classification", inner_lr=0.3, inner_steps=2)
    meta = _params(model, algo)
    tasks = _images()
    _close(algo.batched_task_updates(meta, tasks)[0], algo.vmapped_task_updates(meta, tasks)[0], rtol=1e-8)


@pytest.mark.parametrize("cls", [MAML, MetaSGD, ANIL])
def test_batched_meta_gradient_matches_finite_differences(cls: type[MAML]) -> None:
    """Each task's row of the batched second-order gradient against central differences of its own outer loss."""
    model = _conv4()
    algo = cls(model, kind="classification", inner_lr=0.3, inner_steps=2)
    meta = _params(model, algo, seed=3)
    tasks = _images(tasks=2)
    grads, _ = algo.batched_task_updates(meta, tasks)
    _assert_matches_finite_differences(algo, meta, tasks, grads)


@pytest.mark.parametrize("name", regression_algorithms())
def test_default_batched_methods_serve_the_mlp(name: str) -> None:
    """A model without native batching (the MLP) keeps the vmap path, and the batched path still agrees."""
    model = MLP((1,), (16, 16), 1)
    assert not model.batched_tasks
    algo = ALGORITHMS.get(name)(model, kind="regression", inner_lr=0.05, inner_steps=2)
    meta = _params(model, algo)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(4, 7, 1, generator=gen, dtype=torch.float64) * 10 - 5
    tasks = TaskBatch(x[:, :3], torch.sin(x[:, :3]), x[:, 3:], torch.sin(x[:, 3:]), "regression")
    g_vmap, m_vmap = algo.task_updates(meta, tasks)
    g_batched, m_batched = algo.batched_task_updates(meta, tasks)
    _close(g_batched, g_vmap)
    _close(m_batched, m_vmap)


@pytest.mark.parametrize("cls", [MAML, MetaSGD, ANIL])
def test_adapt_tasks_matches_adapt(cls: type[MAML]) -> None:
    """Test-time adaptation in one batched pass equals the per-task (vmapped) adaptation, and is detached."""
    model = _conv4()
    algo = cls(model, kind="classification", inner_lr=0.3, inner_steps=1)
    meta = _params(model, algo)
    tasks = _images()
    stacked = {k: v.unsqueeze(0).expand(tasks.num_tasks, *v.shape) for k, v in meta.items()}
    adapted, start = algo.adapt_tasks(stacked, tasks.support_x, tasks.support_y, 3, first_order=True)
    reference, ref_start = vmap(lambda x, y: algo.adapt_with_loss(meta, x, y, 3, first_order=True))(
        tasks.support_x, tasks.support_y
    )
    _close(adapted, reference)
    _close({"loss": start}, {"loss": ref_start})
    assert not any(v.requires_grad for v in adapted.values())


def test_anil_adaptation_runs_the_body_once_with_the_same_result() -> None:
    """ANIL's head-only adaptation and adaptation curve equal the generic loop over all parameters' forward passes."""
    model = _conv4()
    algo = ANIL(model, kind="classification", inner_lr=0.3, inner_steps=2)
    meta = _params(model, algo)
    tasks = _images(tasks=1)
    sx, sy, qx, qy = tasks.support_x[0], tasks.support_y[0], tasks.query_x[0], tasks.query_y[0]
    fast, loss = algo.adapt_with_loss(meta, sx, sy, 3)
    slow, slow_loss = MetaAlgorithm.adapt_with_loss(algo, meta, sx, sy, 3)
    _close(fast, slow)
    torch.testing.assert_close(loss, slow_loss)
    curve = algo.adaptation_curve(meta, sx, sy, qx, qy, 4)
    generic = MetaAlgorithm.adaptation_curve(algo, meta, sx, sy, qx, qy, 4)
    _close(curve, generic)


@pytest.mark.parametrize("head_init", ["zero", "prototypes"])
def test_anil_head_init_meta_gradient_batched_vmapped_and_finite_differences(head_init: str) -> None:
    """ANIL starting from a zero or prototype head: both paths agree, match central differences,
    the stored head gets no gradient (it is not used) and the body does (through the prototypes too)."""
    model = _conv4()
    algo = ANIL(model, kind="classification", inner_lr=0.3, inner_steps=2, head_init=head_init)
    meta = _params(model, algo, seed=3)
    tasks = _images(tasks=2)
    grads, metrics = algo.batched_task_updates(meta, tasks)
    g_vmap, m_vmap = algo.vmapped_task_updates(meta, tasks)
    _close(grads, g_vmap)
    _close(metrics, m_vmap)
    for k in model.head_keys():
        assert float(grads[k].abs().max()) == 0.0, k
    assert all(float(grads[k].abs().sum()) > 0 for k in meta if not k.startswith("head."))
    _assert_matches_finite_differences(algo, meta, tasks, grads)


def test_prototype_head_is_the_nearest_class_mean_classifier() -> None:
    """Before any step the prototype head scores each class by minus the squared distance to its
    support mean (plus a per-example constant), so its argmax is the nearest prototype; the
    batched and per-task adaptations from it agree, and the curve starts there."""
    model = _conv4()
    algo = ANIL(model, kind="classification", inner_lr=0.3, inner_steps=1, head_init="prototypes")
    meta = _params(model, algo)
    tasks = _images(support=9)
    sx, sy, qx, qy = tasks.support_x[0], tasks.support_y[0], tasks.query_x[0], tasks.query_y[0]
    hs, hq = model.features(meta, sx), model.features(meta, qx)
    means = torch.stack([hs[sy == c].mean(dim=0) for c in range(WAYS)])
    head = algo.start_head({k: meta[k] for k in model.head_keys()}, hs, sy)
    torch.testing.assert_close(head["head.weight"], 2 * means)
    logits = model.head(head, hq)
    distances = torch.cdist(hq, means).pow(2)
    torch.testing.assert_close(logits, hq.pow(2).sum(-1, keepdim=True) - distances)
    nearest = (distances.argmin(-1) == qy).double().mean()
    curve = algo.adaptation_curve(meta, sx, sy, qx, qy, 2)
    assert float(curve["query_accuracy"][0]) == pytest.approx(float(nearest))
    # a stacked start equals the per-task one, and adapt_tasks equals vmapped adapt_with_loss
    stacked = {k: v.unsqueeze(0).expand(tasks.num_tasks, *v.shape) for k, v in meta.items()}
    adapted, start = algo.adapt_tasks(stacked, tasks.support_x, tasks.support_y, 3, first_order=True)
    reference, ref_start = vmap(lambda x, y: algo.adapt_with_loss(meta, x, y, 3, first_order=True))(
        tasks.support_x, tasks.support_y
    )
    _close(adapted, reference)
    _close({"loss": start}, {"loss": ref_start})
    # the result does not depend on the stored head at all
    other = {
        **meta,
        "head.weight": torch.randn_like(meta["head.weight"]),
        "head.bias": torch.randn_like(meta["head.bias"]),
    }
    _close(algo.adapt_with_loss(other, sx, sy, 3)[0], algo.adapt_with_loss(meta, sx, sy, 3)[0])


def test_prototype_head_never_predicts_a_class_without_support_examples() -> None:
    """A class missing from the support set gets no prototype (not one at the origin): no query is
    assigned to it, in the per-task and the stacked start alike; the support loss and the adapted
    head stay finite, while a query of the absent class itself scores a loss of about 1e30 (it
    cannot be answered from this support set; docs/glyphs.md)."""
    model = _conv4()
    algo = ANIL(model, kind="classification", inner_lr=0.3, inner_steps=1, head_init="prototypes")
    meta = _params(model, algo)
    tasks = _images(support=6)
    sy = tasks.support_y.clone()
    sy[sy == 2] = 0  # class 2 has no support example now
    hq = model.features_tasks(
        {k: v.unsqueeze(0).expand(tasks.num_tasks, *v.shape) for k, v in meta.items()}, tasks.query_x
    )
    hs = model.features_tasks(
        {k: v.unsqueeze(0).expand(tasks.num_tasks, *v.shape) for k, v in meta.items()}, tasks.support_x
    )
    head = algo.start_head(
        {k: meta[k].unsqueeze(0).expand(tasks.num_tasks, *meta[k].shape) for k in model.head_keys()}, hs, sy
    )
    predicted = model.head_tasks(head, hq).argmax(-1)
    assert not bool((predicted == 2).any())
    adapted, start = algo.adapt_with_loss(meta, tasks.support_x[0], sy[0], 2)
    assert bool(torch.isfinite(start)) and all(bool(torch.isfinite(v).all()) for v in adapted.values())
    logits = model.forward(adapted, tasks.query_x[0])
    assert not bool((logits.argmax(-1) == 2).any())
    losses = torch.nn.functional.cross_entropy(logits, tasks.query_y[0], reduction="none")
    absent = tasks.query_y[0] == 2
    assert bool(absent.any()) and bool((losses[absent] > 1e29).all())
    assert bool(torch.isfinite(losses[~absent]).all()) and float(losses[~absent].max()) < 1e3
