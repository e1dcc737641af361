"""A new site adapts a published initialization: gains, learned-rate rules, intervals, safety, errors."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmeta.adaptation import (
    adapt_site,
    draw_episodes,
    evaluate_initialization,
    load_initialization,
    load_personalized,
    open_site,
    personalize,
    random_initialization,
    save_personalized,
    stratified_mean_ci95,
)
from fedmeta.algorithms import task_loss
from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import save_checkpoint
from fedmeta.config import config_from_dict, to_dict
from fedmeta.datagen import make_sites
from fedmeta.errors import CheckpointError, ConfigError, DataFormatError
from fedmeta.experiment import Experiment
from fedmeta.models import build_model
from fedmeta.rng import make_generator
from fedmeta.tasks.folder import write_site

# MAML sinusoid, shortened: 400 meta-iterations of 10 tasks with Adam 0.01 take ~10 s on one core
# and already cut the 10-step held-out loss to roughly a third of the pre-adaptation loss.
SINUSOID = {
    "seed": 0,
    "task": {"name": "sinusoid", "shots": 10, "query": 10},
    "model": {"name": "mlp", "hidden": [40, 40]},
    "meta": {"algorithm": "maml", "inner_lr": 0.01, "inner_steps": 1, "outer_lr": 0.01},
    "federation": {"clients_total": 100, "clients_per_round": 10, "rounds": 400},
    "eval": {"tasks": 20, "steps": 10, "every": 400},
}


def _with(base: dict[str, Any], **sections: dict[str, Any]) -> dict[str, Any]:
    out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in base.items()}
    for name, values in sections.items():
        out[name] = {**out.get(name, {}), **values}
    return out


@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A short meta-trained checkpoint and a new site that never took part (make-data, seed 7)."""
    root = tmp_path_factory.mktemp("adapt")
    cfg = config_from_dict(SINUSOID)
    run_centralized(cfg, root / "maml")
    site = make_sites(
        config_from_dict({**SINUSOID, "seed": 7}), 1, root / "sites", tasks_per_site=4, heldout_per_site=3
    )[0]
    return {"checkpoint": root / "maml" / "checkpoint.pt", "site": site, "root": root}


def test_meta_initialization_adapts_far_better_than_before_and_than_random(
    sinusoid_run: dict[str, Path], tmp_path: Path
) -> None:
    report = adapt_site(
        sinusoid_run["checkpoint"], sinusoid_run["site"], tmp_path / "out", episodes=10, split="heldout", steps=10
    )
    meta = report["initializations"]["meta"]["aggregate"]
    rand = report["initializations"]["random"]["aggregate"]
    # "far better": at most half the loss it had before adapting, and the intervals do not touch
    assert meta["post_adapt_loss"] < 0.5 * meta["pre_adapt_loss"]
    assert meta["post_adapt_loss"] + meta["post_adapt_loss_ci95"] < meta["pre_adapt_loss"] - meta["pre_adapt_loss_ci95"]
    assert (
        meta["post_adapt_loss"] + meta["post_adapt_loss_ci95"] < rand["post_adapt_loss"] - rand["post_adapt_loss_ci95"]
    )
    assert len(meta["loss_curve"]) == 11 and meta["loss_curve"][0] == pytest.approx(meta["pre_adapt_loss"])
    per_task = report["initializations"]["meta"]["per_task"]
    assert sorted(per_task) == ["eval-0000", "eval-0001", "eval-0002"]
    assert all(e["episodes"] == 10 and e["post_adapt_loss_ci95"] > 0 for e in per_task.values())
    assert (tmp_path / "out" / "adapt_report.json").is_file() and (
        tmp_path / "out" / "adaptation_curve.png"
    ).stat().st_size > 1000
    assert report["personalized"]["saved"] and report["next"].endswith("docs/deployment.md")


def test_results_are_split_back_to_the_right_tasks(sinusoid_run: dict[str, Path]) -> None:
    site = open_site(sinusoid_run["site"], shots=5, query=7, ways=5)
    init = load_initialization(sinusoid_run["checkpoint"], site)
    episodes = draw_episodes(site, 4, seed=3)
    result = evaluate_initialization(init, episodes, steps=2)
    params = dict(init.params.items())
    for name, batch in episodes.items():
        assert batch.support_x.shape == (4, 5, 1) and batch.query_x.shape == (4, 7, 1)
        direct = torch.stack(
            [task_loss("regression", init.model.forward(params, batch.query_x[e]), batch.query_y[e]) for e in range(4)]
        )
        assert result["per_task"][name]["pre_adapt_loss"] == pytest.approx(float(direct.mean()), rel=1e-5)


def test_episodes_repeat_for_a_seed_and_change_with_it(sinusoid_run: dict[str, Path]) -> None:
    site = open_site(sinusoid_run["site"], shots=10, query=10, ways=5)
    a, b, c = (draw_episodes(site, 3, seed=s) for s in (1, 1, 2))
    for name in a:
        assert torch.equal(a[name].support_x, b[name].support_x) and torch.equal(a[name].query_y, b[name].query_y)
        assert not torch.equal(a[name].support_x, c[name].support_x)
        # episodes of one task differ from one another (fresh support/query draws)
        assert not torch.equal(a[name].support_x[0], a[name].support_x[1])


def test_stratified_interval_formula() -> None:
    x1 = torch.tensor([1.0, 2.0, 3.0, 4.0])
    x2 = torch.tensor([10.0, 10.0, 12.0])
    mean, half = stratified_mean_ci95([x1, x2])
    assert mean == pytest.approx((2.5 + 32 / 3) / 2)
    var_of_mean = float(x1.var()) / 4 + float(x2.var()) / 3
    assert half == pytest.approx(1.96 * math.sqrt(var_of_mean) / 2)
    assert stratified_mean_ci95([torch.tensor([5.0])]) == (5.0, 0.0)


def _checkpoint_for(cfg_dict: dict[str, Any], site: Path, path: Path, *, tweak: Any = None) -> Path:
    """A checkpoint of ``cfg_dict``'s algorithm at a seed-drawn initialization (no training)."""
    cfg = config_from_dict(cfg_dict)
    exp = Experiment(cfg, data_dir=str(site)) if cfg.task.name == "folder" else Experiment(cfg)
    meta = exp.initial_meta_params()
    if tweak is not None:
        meta = tweak(meta)
    return save_checkpoint(
        path, meta_params=meta, round_idx=0, config=to_dict(cfg), model=exp.model.describe(), task_kind=exp.kind
    )


def test_metasgd_adapts_with_its_learned_rates(sinusoid_run: dict[str, Path], tmp_path: Path) -> None:
    gen = make_generator(0, "test-rates")

    def rates(meta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: (torch.rand(v.shape, generator=gen) * 0.05 if k.startswith("lr.") else v) for k, v in meta.items()}

    ckpt = _checkpoint_for(
        _with(SINUSOID, meta={"algorithm": "metasgd"}), sinusoid_run["site"], tmp_path / "msgd.pt", tweak=rates
    )
    site = open_site(sinusoid_run["site"], shots=10, query=10, ways=5)
    init = load_initialization(ckpt, site)
    assert init.info["learned_rates"]
    tasks, skipped = personalize(init, site, steps=1)
    assert not skipped
    task = site.tasks[0]
    theta = {k: v.clone().requires_grad_(True) for k, v in init.params.items() if not k.startswith("lr.")}
    x, y = torch.from_numpy(task.x), torch.from_numpy(task.y)
    loss = torch.nn.functional.mse_loss(init.model.forward(theta, x), y)
    grads = dict(zip(theta, torch.autograd.grad(loss, list(theta.values()))))
    for k in theta:
        expected = theta[k].detach() - init.params[f"lr.{k}"] * grads[k]
        torch.testing.assert_close(tasks[task.name].params[k], expected, rtol=1e-5, atol=1e-6)
    # and not the plain inner_lr step
    k = "head.weight"
    plain = theta[k].detach() - 0.01 * grads[k]
    assert not torch.allclose(tasks[task.name].params[k], plain, atol=1e-6)


def test_anil_adapts_the_head_only(sinusoid_run: dict[str, Path], tmp_path: Path) -> None:
    ckpt = _checkpoint_for(
        _with(SINUSOID, meta={"algorithm": "anil", "inner_lr": 0.05}), sinusoid_run["site"], tmp_path / "anil.pt"
    )
    site = open_site(sinusoid_run["site"], shots=10, query=10, ways=5)
    init = load_initialization(ckpt, site)
    assert init.info["adapts"] == "head only"
    tasks, _ = personalize(init, site, steps=3)
    adapted = tasks[site.tasks[0].name].params
    for k, v in init.params.items():
        if k.startswith("head."):
            assert not torch.equal(adapted[k], v)
        else:
            assert torch.equal(adapted[k], v)


def test_random_baseline_is_seed_derived_and_keeps_the_rule(sinusoid_run: dict[str, Path]) -> None:
    site = open_site(sinusoid_run["site"], shots=10, query=10, ways=5)
    init = load_initialization(sinusoid_run["checkpoint"], site)
    a, b, c = random_initialization(init, 1), random_initialization(init, 1), random_initialization(init, 2)
    assert all(torch.equal(a.params[k], b.params[k]) for k in a.params)
    assert not torch.equal(a.params["head.weight"], c.params["head.weight"])
    assert a.algorithm is init.algorithm and set(a.params) == set(init.params)


def test_personalized_models_round_trip_and_predict(sinusoid_run: dict[str, Path], tmp_path: Path) -> None:
    site = open_site(sinusoid_run["site"], shots=10, query=10, ways=5)
    init = load_initialization(sinusoid_run["checkpoint"], site)
    tasks, _ = personalize(init, site, steps=5)
    save_personalized(tmp_path / "models", init, site, tasks, steps=5)
    for f in (tmp_path / "models").glob("*.pt"):
        state = torch.load(f, weights_only=True)
        assert all(isinstance(v, torch.Tensor) for v in state.values())
    models = load_personalized(tmp_path)  # the adapt output folder works as well as models/
    assert models.tasks == [t.name for t in site.tasks]
    name = site.tasks[1].name
    x = np.linspace(-5, 5, 7, dtype=np.float32)[:, None]
    expected = init.model.forward(tasks[name].params, torch.from_numpy(x))
    np.testing.assert_allclose(models.predict(name, x), expected.detach().numpy(), rtol=1e-6)
    np.testing.assert_allclose(models.predict(name, x[:, 0]), expected.detach().numpy(), rtol=1e-6)
    # adapted on its own data: the personalized model fits the task better than the initialization
    task = site.tasks[1]
    fit = float(np.mean((models.predict(name, task.x) - task.y) ** 2))
    before = float(
        torch.nn.functional.mse_loss(
            init.model.forward(init.params, torch.from_numpy(task.x)), torch.from_numpy(task.y)
        )
    )
    assert fit < before
    with pytest.raises(DataFormatError, match="no task 'nope'"):
        models.predict("nope", x)
    with pytest.raises(DataFormatError, match="name one with --task"):
        models.predict(None, x)
    with pytest.raises(DataFormatError, match="do not fit"):
        models.predict(name, np.zeros((3, 2), np.float32))


def _image_site(root: Path, *, classes: int, per_class: int, tasks: int, seed: int) -> Path:
    """A classification site of 8x8 'images' whose class is a bright row (arrays, like make-data)."""
    rng = np.random.default_rng(seed)
    items = []
    for t in range(tasks):
        rows = rng.choice(8, size=classes, replace=False)
        x = rng.uniform(0, 0.3, size=(classes * per_class, 1, 8, 8)).astype(np.float32)
        y = np.repeat(np.arange(classes), per_class)
        for i, c in enumerate(y):
            x[i, 0, rows[c]] += 0.7
        items.append((f"task-{t}", x, y.astype(np.int64)))
    return write_site(root, items, kind="classification")


def test_classification_models_answer_with_the_sites_labels(tmp_path: Path) -> None:
    site_dir = _image_site(tmp_path / "cls", classes=3, per_class=6, tasks=2, seed=0)
    cfg = {
        "task": {"name": "folder", "data_dir": str(site_dir), "ways": 3, "shots": 2, "query": 2},
        "model": {"name": "mlp", "hidden": [16]},
        "meta": {"inner_lr": 0.5},
    }
    ckpt = _checkpoint_for(cfg, site_dir, tmp_path / "cls.pt")
    report = adapt_site(ckpt, site_dir, tmp_path / "out", episodes=3, steps=5)
    agg = report["initializations"]["meta"]["aggregate"]
    assert 0 <= agg["post_adapt_accuracy"] <= 1 and len(agg["accuracy_curve"]) == 6
    models = load_personalized(tmp_path / "out")
    preds = models.predict("task-0", np.zeros((4, 1, 8, 8), np.float32))
    assert preds.shape == (4,) and set(preds.tolist()) <= {0, 1, 2}


def _anil_cfg(site_dir: Path, head_init: str, ways: int = 3) -> dict[str, Any]:
    return {
        "task": {"name": "folder", "data_dir": str(site_dir), "ways": ways, "shots": 2, "query": 2},
        "model": {"name": "mlp", "hidden": [32]},
        "meta": {"algorithm": "anil", "head_init": head_init, "inner_lr": 0.5},
    }


def test_a_way_agnostic_checkpoint_serves_sites_with_other_numbers_of_classes(tmp_path: Path) -> None:
    """An ANIL checkpoint with a prototype head, trained 3-way, adapts to 4-way episodes (--ways)
    and personalizes every task with all of its classes; the random baseline keeps its rule."""
    trained_on = _image_site(tmp_path / "three", classes=3, per_class=6, tasks=1, seed=0)
    ckpt = _checkpoint_for(_anil_cfg(trained_on, "prototypes"), trained_on, tmp_path / "proto.pt")
    site = _image_site(tmp_path / "four", classes=4, per_class=6, tasks=3, seed=1)
    report = adapt_site(ckpt, site, tmp_path / "out4", episodes=4, steps=3, ways=4)
    info = report["initializations"]["meta"]["info"]
    assert report["settings"]["ways"] == 4 and report["site"]["outputs"] == 4
    assert info["head_init"] == "prototypes" and info["trained_ways"] == 3 and info["serves_any_ways"]
    meta = report["initializations"]["meta"]["aggregate"]
    # nearest-prototype on these bright-row images: well above chance (0.25) before any step
    assert meta["pre_adapt_accuracy"] > 0.6 and meta["post_adapt_accuracy"] > 0.6
    # the random baseline adapts with the same rule (its head from the prototypes too), built for 4 ways
    rand = report["initializations"]["random"]
    assert (
        rand["algorithm"] == "anil"
        and rand["info"]["head_init"] == "prototypes"
        and rand["info"]["trained_ways"] is None
    )
    assert len(rand["aggregate"]["accuracy_curve"]) == 4
    models = load_personalized(tmp_path / "out4")
    assert sorted(models.tasks) == ["task-0", "task-1", "task-2"]
    assert models.params("task-0")["head.weight"].shape[0] == 4
    x = np.load(site / "tasks" / "task-0.npz")["x"]
    assert set(models.predict("task-0", x).tolist()) <= {0, 1, 2, 3}
    # at the checkpoint's own 3 ways the episodes are 3-way subsets, and the models still take
    # every class of a task (a learned head would skip them: it has 3 outputs)
    report3 = adapt_site(ckpt, site, tmp_path / "out3", episodes=2, steps=1)
    assert report3["settings"]["ways"] == 3 and not report3["personalized"]["skipped"]
    models3 = load_personalized(tmp_path / "out3")
    assert models3.manifest["model"]["outputs"] == 3 and models3.manifest["tasks"]["task-1"]["outputs"] == 4
    assert models3.params("task-1")["head.weight"].shape[0] == 4
    y = np.load(site / "tasks" / "task-1.npz")["y"]
    x1 = np.load(site / "tasks" / "task-1.npz")["x"]
    # adapted on these very examples: the 4-class model tells all four classes apart
    assert float(np.mean(models3.predict("task-1", x1) == y)) > 0.9


def test_version_1_manifests_without_per_task_outputs_still_load(tmp_path: Path) -> None:
    site_dir = _image_site(tmp_path / "cls", classes=3, per_class=6, tasks=1, seed=0)
    cfg = {
        "task": {"name": "folder", "data_dir": str(site_dir), "ways": 3, "shots": 2, "query": 2},
        "model": {"name": "mlp", "hidden": [16]},
    }
    adapt_site(_checkpoint_for(cfg, site_dir, tmp_path / "c.pt"), site_dir, tmp_path / "out", episodes=2, steps=1)
    manifest_path = tmp_path / "out" / "models" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["version"] == 2
    manifest["version"] = 1
    for entry in manifest["tasks"].values():
        del entry["outputs"]
    manifest_path.write_text(json.dumps(manifest))
    assert load_personalized(tmp_path / "out").predict("task-0", np.zeros((3, 1, 8, 8), np.float32)).shape == (3,)
    manifest["tasks"]["task-0"] = None
    manifest_path.write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest.json': 'tasks' must map each task name"):
        load_personalized(tmp_path / "out")


def test_ways_is_refused_for_regression_checkpoints(sinusoid_run: dict[str, Path], tmp_path: Path) -> None:
    with pytest.raises(
        ConfigError,
        match=r"--ways applies to classification checkpoints; '.*checkpoint.pt' was meta-trained on regression",
    ):
        adapt_site(sinusoid_run["checkpoint"], sinusoid_run["site"], tmp_path / "o", ways=3)
    assert not (tmp_path / "o").exists()


def test_other_numbers_of_ways_are_refused_clearly(tmp_path: Path) -> None:
    site3 = _image_site(tmp_path / "three", classes=3, per_class=6, tasks=1, seed=0)
    learned = _checkpoint_for(_anil_cfg(site3, "learned"), site3, tmp_path / "learned.pt")
    proto = _checkpoint_for(_anil_cfg(site3, "prototypes"), site3, tmp_path / "proto.pt")
    site4 = _image_site(tmp_path / "four", classes=4, per_class=6, tasks=1, seed=1)
    with pytest.raises(CheckpointError, match=r"learned.pt' has a learned 3-way head.*not --ways 4.*'prototypes'"):
        adapt_site(learned, site4, tmp_path / "o1", ways=4)
    # a learned head compared on a 4-way site: the same message, naming that checkpoint
    with pytest.raises(CheckpointError, match=r"learned.pt' has a learned 3-way head.*not 4-way ones"):
        adapt_site(proto, site4, tmp_path / "o2", ways=4, compare=learned)
    site2 = _image_site(tmp_path / "two", classes=2, per_class=6, tasks=1, seed=2)
    with pytest.raises(DataFormatError, match=r"only 2 classes.*serves any number of ways: pass --ways"):
        adapt_site(proto, site2, tmp_path / "o3")
    with pytest.raises(ConfigError, match="--ways must be at least 2"):
        adapt_site(proto, site2, tmp_path / "o4", ways=1)
    assert not any((tmp_path / d).exists() for d in ("o1", "o2", "o3", "o4"))


# ---------------------------------------------------------------------------------------------
# Bad input: each a domain error naming the file


def test_missing_and_corrupt_checkpoints(sinusoid_run: dict[str, Path], tmp_path: Path) -> None:
    site = sinusoid_run["site"]
    with pytest.raises(CheckpointError, match="missing.pt' does not exist"):
        adapt_site(tmp_path / "missing.pt", site, tmp_path / "o")
    # random bytes: torch's restricted unpickler fails in different ways on different garbage
    # (UnpicklingError, UnicodeDecodeError, IndexError, KeyError for these seeds); all are "corrupt"
    for seed in (0, 17, 54, 62):
        bad = tmp_path / f"corrupt-{seed}.pt"
        bad.write_bytes(np.random.default_rng(seed).bytes(2048))
        with pytest.raises(CheckpointError, match=f"corrupt-{seed}.pt' is corrupt"):
            adapt_site(bad, site, tmp_path / "o")
    trunc = tmp_path / "truncated.pt"
    trunc.write_bytes(sinusoid_run["checkpoint"].read_bytes()[:500])
    with pytest.raises(CheckpointError, match="truncated.pt'"):
        adapt_site(trunc, site, tmp_path / "o")
    plain = tmp_path / "plain.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(CheckpointError, match="plain.pt' is not a fedmeta checkpoint"):
        adapt_site(plain, site, tmp_path / "o")
    with pytest.raises(CheckpointError, match="missing.pt' does not exist"):
        adapt_site(sinusoid_run["checkpoint"], site, tmp_path / "o", compare=tmp_path / "missing.pt")


class _Exploit:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_a_crafted_checkpoint_cannot_run_code(sinusoid_run: dict[str, Path], tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    crafted = tmp_path / "crafted.pt"
    torch.save({"format": "fedmeta-checkpoint", "meta_params": {"x": _Exploit(marker)}}, crafted)
    with pytest.raises(CheckpointError, match="crafted.pt' is corrupt or not a safe tensor-only file"):
        adapt_site(crafted, sinusoid_run["site"], tmp_path / "o")
    assert not marker.exists()


def test_incompatible_checkpoints_are_refused_before_adapting(sinusoid_run: dict[str, Path], tmp_path: Path) -> None:
    site = sinusoid_run["site"]
    # a classification checkpoint against regression data
    cls_site = _image_site(tmp_path / "cls", classes=3, per_class=6, tasks=1, seed=1)
    cls_cfg = {
        "task": {"name": "folder", "data_dir": str(cls_site), "ways": 3, "shots": 2, "query": 2},
        "model": {"name": "mlp", "hidden": [8]},
    }
    cls_ckpt = _checkpoint_for(cls_cfg, cls_site, tmp_path / "cls.pt")
    with pytest.raises(CheckpointError, match="cls.pt' was trained on classification tasks.*holds regression tasks"):
        adapt_site(cls_ckpt, site, tmp_path / "o")
    # the sinusoid checkpoint against 2-feature regression inputs: the first layer does not fit
    wide = write_site(
        tmp_path / "wide", [("t", np.zeros((30, 2), np.float32), np.zeros(30, np.float32))], kind="regression"
    )
    with pytest.raises(CheckpointError, match=r"checkpoint.pt': parameter 'body.1.weight' has shape \(40, 1\)"):
        adapt_site(sinusoid_run["checkpoint"], wide, tmp_path / "o")
    # a tampered file: parameters that do not fit the model its own config describes
    shrunk = _checkpoint_for(
        SINUSOID, site, tmp_path / "shrunk.pt", tweak=lambda m: {**m, "head.weight": torch.zeros(1, 7)}
    )
    with pytest.raises(CheckpointError, match="shrunk.pt': parameter 'head.weight' has shape"):
        adapt_site(shrunk, site, tmp_path / "o")
    # Meta-SGD without its learned rates
    no_rates = _checkpoint_for(
        _with(SINUSOID, meta={"algorithm": "metasgd"}),
        site,
        tmp_path / "norates.pt",
        tweak=lambda m: {k: v for k, v in m.items() if not k.startswith("lr.")},
    )
    with pytest.raises(CheckpointError, match="norates.pt' is a Meta-SGD checkpoint without a learned rate"):
        adapt_site(no_rates, site, tmp_path / "o")
    # a comparison checkpoint is checked the same way
    with pytest.raises(CheckpointError, match="cls.pt' was trained on classification"):
        adapt_site(sinusoid_run["checkpoint"], site, tmp_path / "o", compare=cls_ckpt)


def test_bad_site_folders_name_the_file(sinusoid_run: dict[str, Path], tmp_path: Path) -> None:
    ckpt = sinusoid_run["checkpoint"]
    with pytest.raises(DataFormatError, match="nowhere' does not exist"):
        adapt_site(ckpt, tmp_path / "nowhere", tmp_path / "o")
    with pytest.raises(DataFormatError, match="is a folder of 1 sites.*site-0000"):
        adapt_site(ckpt, sinusoid_run["root"] / "sites", tmp_path / "o")
    bad = tmp_path / "bad"
    (bad / "tasks").mkdir(parents=True)
    np.savez(bad / "tasks" / "odd.npz", inputs=np.zeros(3))
    with pytest.raises(DataFormatError, match="odd.npz' must contain arrays 'x' and 'y'"):
        adapt_site(ckpt, bad, tmp_path / "o")
    with pytest.raises(DataFormatError, match="has no heldout/ folder"):
        adapt_site(ckpt, _only_tasks(tmp_path), tmp_path / "o", split="heldout")


def _only_tasks(tmp_path: Path) -> Path:
    x = np.linspace(-5, 5, 30, dtype=np.float32)[:, None]
    return write_site(tmp_path / "only", [("t", x, np.sin(x))], kind="regression")


def test_too_few_examples_for_the_requested_shots(sinusoid_run: dict[str, Path], tmp_path: Path) -> None:
    # make-data stored 2 * (10 + 10) = 40 points per task
    with pytest.raises(
        DataFormatError, match=r"tasks/train-0000.npz' has 40 examples; an episode of 35 support \(shots\) \+ 10 query"
    ):
        adapt_site(sinusoid_run["checkpoint"], sinusoid_run["site"], tmp_path / "o", shots=35)
    with pytest.raises(ConfigError, match="--steps must be at least 1"):
        adapt_site(sinusoid_run["checkpoint"], sinusoid_run["site"], tmp_path / "o", steps=0)


def test_a_model_with_the_wrong_input_size_is_refused(tmp_path: Path) -> None:
    site_dir = _image_site(tmp_path / "cls", classes=3, per_class=6, tasks=1, seed=2)
    cfg = {
        "task": {"name": "folder", "data_dir": str(site_dir), "ways": 3, "shots": 2, "query": 2},
        "model": {"name": "mlp", "hidden": [8]},
    }
    ckpt = _checkpoint_for(cfg, site_dir, tmp_path / "cls.pt")
    # same classes, bigger images: the flattened input no longer matches the first layer
    big = _image_site(tmp_path / "big", classes=3, per_class=6, tasks=1, seed=3)
    for f in (big / "tasks").glob("*.npz"):
        with np.load(f) as d:
            np.savez(f, x=np.pad(d["x"], ((0, 0), (0, 0), (0, 2), (0, 2))), y=d["y"])
    with pytest.raises(CheckpointError, match="cls.pt': parameter 'body.1.weight' has shape"):
        adapt_site(ckpt, big, tmp_path / "o")
    model = build_model(config_from_dict(cfg), (1, 8, 8), 3)
    assert model.param_shapes["body.1.weight"] == (8, 64)
