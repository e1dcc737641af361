"""Prototypical Networks: the objective against a hand-written loop, the meta-gradient against finite
differences (float64), both batching paths, adaptation, evaluation, a checkpoint at a new site, and
the refusal of regression tasks."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import vmap

from fedmeta.adaptation import adapt_site, load_personalized, serves_any_ways
from fedmeta.algorithms import ALGORITHMS, ProtoNet, build_algorithm
from fedmeta.checkpoint import save_checkpoint
from fedmeta.config import config_from_dict, load_config, to_dict
from fedmeta.errors import ConfigError
from fedmeta.evaluation import evaluate
from fedmeta.experiment import Experiment
from fedmeta.models import MLP
from fedmeta.models.conv4 import Conv4
from fedmeta.tasks.folder import write_site
from fedmeta.types import TaskBatch
from tests.unit.algorithms.helpers import image_tasks, perturbed
from tests.unit.test_adaptation import _image_site

SHAPE = (1, 20, 20)
WAYS = 3


def _conv4(batched: bool = True) -> Conv4:
    return Conv4(SHAPE, WAYS, channels=8, batched_tasks=batched)


def _params(algo: ProtoNet, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return perturbed(algo.init_meta_params(gen), gen)


def _images(tasks: int = 3, support: int = 6, query: int = 9, seed: int = 1) -> TaskBatch:
    return image_tasks(SHAPE, WAYS, tasks=tasks, support=support, query=query, seed=seed)


def _hand_written_loss(
    model: Conv4 | MLP, params: dict[str, torch.Tensor], sx, sy, qx, qy
) -> tuple[torch.Tensor, float]:
    """Snell et al.'s objective written out with plain loops: prototypes, distances, softmax, cross-entropy."""
    hs, hq = model.features(params, sx), model.features(params, qx)
    prototypes = []
    for c in range(WAYS):
        members = [hs[i] for i in range(hs.shape[0]) if int(sy[i]) == c]
        prototypes.append(sum(members) / len(members))
    total, correct = torch.zeros((), dtype=hq.dtype), 0
    for i in range(hq.shape[0]):
        logits = [-sum((hq[i, f] - prototypes[c][f]) ** 2 for f in range(hq.shape[1])) for c in range(WAYS)]
        top = max(logits)
        log_norm = top + torch.log(sum(torch.exp(v - top) for v in logits))
        total = total - (logits[int(qy[i])] - log_norm)
        correct += int(max(range(WAYS), key=lambda c: float(logits[c])) == int(qy[i]))
    return total / hq.shape[0], correct / hq.shape[0]


def _mean_outer_loss(algo: ProtoNet, meta: dict[str, torch.Tensor], tasks: TaskBatch) -> torch.Tensor:
    return torch.stack(
        [
            algo.outer_loss(meta, tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t])[0]
            for t in range(tasks.num_tasks)
        ]
    ).mean()


def test_objective_equals_a_hand_written_implementation() -> None:
    model = _conv4()
    algo = ProtoNet(model, kind="classification", inner_lr=0.1, inner_steps=1)
    meta = _params(algo)
    tasks = _images()
    _, metrics = algo.task_updates(meta, tasks)
    for t in range(tasks.num_tasks):
        args = (tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t])
        expected, accuracy = _hand_written_loss(model, meta, *args)
        loss, _ = algo.outer_loss(meta, *args)
        assert float(loss) == pytest.approx(float(expected), rel=1e-12)
        assert float(metrics["query_loss_post"][t]) == pytest.approx(float(expected), rel=1e-12)
        assert float(metrics["query_accuracy_post"][t]) == pytest.approx(accuracy)
        # no inner loop: "before" and "after" adaptation are the same classifier
        assert float(metrics["query_loss_pre"][t]) == float(metrics["query_loss_post"][t])
        assert float(metrics["support_loss_pre"][t]) == float(metrics["support_loss_post"][t])


@pytest.mark.parametrize("batched", [True, False])
def test_meta_gradient_matches_finite_differences_and_skips_the_head(batched: bool) -> None:
    """The mean meta-gradient (batched Conv-4 path, or vmap) along random directions against central differences."""
    model = _conv4(batched=batched)
    algo = ProtoNet(model, kind="classification", inner_lr=0.1, inner_steps=1)
    meta = _params(algo, seed=3)
    tasks = _images(tasks=2)
    update = algo.meta_gradient(meta, tasks)
    gen = torch.Generator().manual_seed(7)
    eps = 1e-7  # the loss is only piecewise smooth (ReLU kinks)
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in meta.items()}
        plus = _mean_outer_loss(algo, {k: meta[k] + eps * v[k] for k in meta}, tasks)
        minus = _mean_outer_loss(algo, {k: meta[k] - eps * v[k] for k in meta}, tasks)
        numeric = float((plus - minus) / (2 * eps))
        analytic = float(sum((update.gradient[k] * v[k]).sum() for k in meta))
        assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)
    # the head is never used; every body parameter gets a gradient
    assert all(float(update.gradient[k].abs().max()) == 0.0 for k in model.head_keys())
    assert all(float(update.gradient[k].abs().sum()) > 0 for k in meta if k.startswith("body."))


def test_batched_and_vmapped_paths_agree_and_leave_meta_alone() -> None:
    model = _conv4()
    algo = ProtoNet(model, kind="classification", inner_lr=0.1, inner_steps=1)
    meta = _params(algo)
    before = {k: v.clone() for k, v in meta.items()}
    tasks = _images()
    g_batched, m_batched = algo.batched_task_updates(meta, tasks)
    g_vmap, m_vmap = algo.vmapped_task_updates(meta, tasks)
    for k in g_vmap:
        torch.testing.assert_close(g_batched[k], g_vmap[k], rtol=1e-10, atol=1e-14)
    for k in m_vmap:
        torch.testing.assert_close(m_batched[k], m_vmap[k], rtol=1e-10, atol=1e-14)
    assert all(torch.equal(meta[k], before[k]) and not meta[k].requires_grad for k in meta)


def test_mlp_body_works_on_the_vmap_path() -> None:
    model = MLP((4,), (16,), WAYS)
    algo = ProtoNet(model, kind="classification", inner_lr=0.1, inner_steps=1)
    meta = {k: v.double() for k, v in algo.init_meta_params(torch.Generator().manual_seed(0)).items()}
    gen = torch.Generator().manual_seed(1)
    tasks = TaskBatch(
        torch.randn(2, 6, 4, generator=gen, dtype=torch.float64),
        torch.arange(6).remainder(WAYS).expand(2, -1).clone(),
        torch.randn(2, 5, 4, generator=gen, dtype=torch.float64),
        torch.randint(0, WAYS, (2, 5), generator=gen),
        "classification",
    )
    grads, metrics = algo.task_updates(meta, tasks)
    for t in range(2):
        expected, _ = _hand_written_loss(
            model, meta, tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
        )
        assert float(metrics["query_loss_post"][t]) == pytest.approx(float(expected), rel=1e-12)
    assert float(grads["body.1.weight"].abs().sum()) > 0


def test_adapted_model_is_the_prototype_classifier() -> None:
    """Adapting sets the linear head to (2c, -||c||^2): the ordinary model's logits are the negative
    squared distances plus a per-example constant, whatever the stored head; the curve is flat at
    the prototype classifier's accuracy; the batched adaptation equals the per-task one."""
    model = _conv4()
    algo = ProtoNet(model, kind="classification", inner_lr=0.1, inner_steps=1)
    meta = _params(algo)
    tasks = _images(support=9)
    sx, sy, qx, qy = tasks.support_x[0], tasks.support_y[0], tasks.query_x[0], tasks.query_y[0]
    adapted, start_loss = algo.adapt_with_loss(meta, sx, sy, 5)
    hs, hq = model.features(meta, sx), model.features(meta, qx)
    means = torch.stack([hs[sy == c].mean(dim=0) for c in range(WAYS)])
    distances = torch.cdist(hq, means).pow(2)
    torch.testing.assert_close(model.forward(adapted, qx), hq.pow(2).sum(-1, keepdim=True) - distances)
    torch.testing.assert_close(start_loss, algo.loss(adapted, sx, sy))
    other = {
        **meta,
        "head.weight": torch.randn_like(meta["head.weight"]),
        "head.bias": torch.randn_like(meta["head.bias"]),
    }
    for k, v in algo.adapt_with_loss(other, sx, sy, 5)[0].items():
        torch.testing.assert_close(v, adapted[k])
    curve = algo.adaptation_curve(meta, sx, sy, qx, qy, 3)
    accuracy = float((distances.argmin(-1) == qy).double().mean())
    assert curve["query_accuracy"].tolist() == pytest.approx([accuracy] * 4)
    assert curve["query_loss"].shape == (4,) and float(curve["query_loss"].std()) == 0.0
    stacked = {k: v.unsqueeze(0).expand(tasks.num_tasks, *v.shape) for k, v in meta.items()}
    batched, batched_start = algo.adapt_tasks(stacked, tasks.support_x, tasks.support_y, 2, first_order=True)
    reference, ref_start = vmap(lambda x, y: algo.adapt_with_loss(meta, x, y, 2, first_order=True))(
        tasks.support_x, tasks.support_y
    )
    for k in reference:
        torch.testing.assert_close(batched[k], reference[k], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(batched_start, ref_start)
    assert not any(v.requires_grad for v in batched.values())


def test_evaluation_at_any_number_of_steps_is_the_prototype_classifier() -> None:
    model = _conv4()
    algo = ProtoNet(model, kind="classification", inner_lr=0.1, inner_steps=1)
    meta = _params(algo)
    tasks = _images(tasks=4)
    result = evaluate(algo, meta, tasks, steps=3, batch=3)
    assert result.accuracy is not None and result.accuracy.shape == (4, 4)
    for t in range(4):
        _, accuracy = _hand_written_loss(
            model, meta, tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t]
        )
        assert result.accuracy[t].tolist() == pytest.approx([accuracy] * 4)


def test_regression_is_refused_naming_meta_algorithm(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'meta.algorithm' is 'protonet'.*classification.*regression"):
        build_algorithm("protonet", MLP((1,), (8,), 1), kind="regression", inner_lr=0.1, inner_steps=1)
    with pytest.raises(ConfigError, match=r"'meta.algorithm' is 'protonet'.*task.name 'sinusoid' is regression"):
        config_from_dict({"task": {"name": "sinusoid"}, "meta": {"algorithm": "protonet"}})
    with pytest.raises(ConfigError, match=r"'meta.head_init' must be 'learned'.*'protonet'.*got 'prototypes'"):
        config_from_dict(
            {
                "task": {"name": "glyphs"},
                "model": {"name": "conv4"},
                "meta": {"algorithm": "protonet", "head_init": "prototypes"},
            }
        )
    # a folder site's kind is known only when it is opened: then the algorithm refuses it
    site = write_site(
        tmp_path / "reg", [("t", np.zeros((6, 1), np.float32), np.zeros((6, 1), np.float32))], kind="regression"
    )
    cfg = config_from_dict(
        {"task": {"name": "folder", "data_dir": str(site), "shots": 2, "query": 2}, "meta": {"algorithm": "protonet"}}
    )
    with pytest.raises(ConfigError, match=r"'meta.algorithm' is 'protonet'"):
        Experiment(cfg)


def test_registered_and_way_agnostic() -> None:
    assert ALGORITHMS.get("protonet") is ProtoNet and "protonet" in ALGORITHMS.names()
    cfg = config_from_dict({"task": {"name": "glyphs"}, "model": {"name": "conv4"}, "meta": {"algorithm": "protonet"}})
    assert serves_any_ways(cfg, "classification") and not serves_any_ways(cfg, "regression")


def test_checkpoint_adapts_at_a_new_site_with_other_ways(tmp_path: Path) -> None:
    """A ProtoNet checkpoint (3-way) at a new site of 4 classes: ``fedmeta adapt --ways 4``, a flat curve,
    personalized models that classify with every class of their task."""
    trained_on = _image_site(tmp_path / "three", classes=3, per_class=6, tasks=1, seed=0)
    cfg = config_from_dict(
        {
            "task": {"name": "folder", "data_dir": str(trained_on), "ways": 3, "shots": 2, "query": 2},
            "model": {"name": "mlp", "hidden": [32]},
            "meta": {"algorithm": "protonet"},
        }
    )
    exp = Experiment(cfg, data_dir=str(trained_on))
    ckpt = save_checkpoint(
        tmp_path / "proto.pt",
        meta_params=exp.initial_meta_params(),
        round_idx=0,
        config=to_dict(cfg),
        model=exp.model.describe(),
        task_kind=exp.kind,
    )
    site = _image_site(tmp_path / "four", classes=4, per_class=6, tasks=2, seed=1)
    report = adapt_site(ckpt, site, tmp_path / "out", episodes=4, steps=3, ways=4)
    meta = report["initializations"]["meta"]
    assert meta["info"]["serves_any_ways"] and meta["info"]["algorithm"] == "protonet"
    assert meta["info"]["adapts"].startswith("no parameters")
    agg = meta["aggregate"]
    # nearest class mean of random features on bright-row images: well above chance (0.25)
    assert agg["pre_adapt_accuracy"] > 0.6 and agg["accuracy_curve"] == pytest.approx([agg["pre_adapt_accuracy"]] * 4)
    models = load_personalized(tmp_path / "out")
    assert models.params("task-0")["head.weight"].shape[0] == 4
    x, y = (np.load(site / "tasks" / "task-1.npz")[k] for k in ("x", "y"))
    assert float(np.mean(models.predict("task-1", x) == y)) > 0.9


@pytest.mark.slow
def test_short_glyph_run_learns(tmp_path: Path) -> None:
    """The shipped config meta-trains (centralized) and beats its untrained start on held-out alphabets."""
    from fedmeta.centralized import run_centralized
    from fedmeta.outputs import read_metrics

    root = Path(__file__).resolve().parents[3]
    cfg = load_config(
        root / "configs" / "glyphs-protonet.yaml",
        [
            "model.channels=8",
            "task.ways=5",
            "federation.rounds=20",
            "federation.clients_total=1",
            "federation.clients_per_round=1",
            "meta.tasks_per_client=2",
            "eval.tasks=40",
            "eval.every=20",
            "eval.batch=40",
            "task.partition=iid",
        ],
    )
    summary = run_centralized(cfg, tmp_path / "run")
    untrained = read_metrics(tmp_path / "run" / "metrics.jsonl")[0]["eval"]
    assert summary["final"]["post_adapt_accuracy"] > untrained["post_adapt_accuracy"]
    assert math.isfinite(summary["final"]["post_adapt_loss"])
    assert (tmp_path / "run" / "checkpoint.pt").is_file()


def test_shipped_config_is_the_benchmark_recipe() -> None:
    cfg = load_config(Path(__file__).resolve().parents[3] / "configs" / "glyphs-protonet.yaml")
    assert (cfg.meta.algorithm, cfg.task.ways, cfg.task.shots, cfg.task.query) == ("protonet", 20, 1, 5)
    assert cfg.federation.clients_per_round * cfg.meta.tasks_per_client == 4


def test_local_meta_steps_vectorize_over_clients() -> None:
    """Several local meta-steps (vmap over clients of the per-task update): one client equals its own run."""
    from fedmeta.local_update import local_meta_update, local_meta_updates

    model = MLP((4,), (16,), WAYS)
    algo = ProtoNet(model, kind="classification", inner_lr=0.1, inner_steps=1)
    meta = algo.init_meta_params(torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(1)

    def batch() -> TaskBatch:
        sy = torch.arange(6).remainder(WAYS).expand(2, -1).clone()
        return TaskBatch(
            torch.randn(2, 6, 4, generator=gen),
            sy,
            torch.randn(2, 5, 4, generator=gen),
            torch.randint(0, WAYS, (2, 5), generator=gen),
            "classification",
        )

    steps = [[batch(), batch()], [batch(), batch()]]
    both = local_meta_updates(algo, meta, steps, lr=0.05)
    alone = local_meta_update(algo, meta, [steps[0][1], steps[1][1]], lr=0.05)
    for k in meta:
        torch.testing.assert_close(both[1].gradient[k], alone.gradient[k], rtol=1e-5, atol=1e-6)
    assert float(both[0].gradient["body.1.weight"].abs().sum()) > 0
