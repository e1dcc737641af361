"""Virtual tasks, adversarial (issue 17): the generator's gradient is exact, the filter admits hard and novel
tasks only, the stage's signatures fire where they should, ε does not move and a resumed run is identical."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.config import Config, config_from_dict
from fedmeta.experiment import Experiment
from fedmeta.federation.stages import RoundState
from fedmeta.generators.adversarial import AdversarialTaskStage, TaskGenerator, post_adaptation_losses
from fedmeta.generators.virtual import generator_stages

NARROW = {"name": "sinusoid", "amplitude": [0.1, 1.05]}
ADVERSARIAL = {
    "mode": "adversarial",
    "depth": 2,
    "weight": 0.4,
    "tasks": 4,
    "family": {"amplitude": [0.1, 5.0]},
    "adversarial": {"candidates": 8, "steps": 2, "lr": 0.05},
}


def _cfg(generators: dict[str, Any] | None = None, **sections: Any) -> Config:
    data: dict[str, Any] = {
        "task": NARROW,
        "meta": {"tasks_per_client": 2},
        "federation": {"clients_total": 8, "clients_per_round": 3, "rounds": 4},
        "eval": {"tasks": 10, "every": 2, "steps": 2},
        **sections,
    }
    if generators is not None:
        data["generators"] = generators
    return config_from_dict(data)


def _rows(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _stage(generators: dict[str, Any]) -> tuple[AdversarialTaskStage, Experiment]:
    cfg = _cfg(generators)
    exp = Experiment(cfg)
    [stage] = generator_stages(cfg, exp, rounds=4)
    assert isinstance(stage, AdversarialTaskStage)
    return stage, exp


def test_the_generator_starts_spread_over_the_declared_box() -> None:
    box = [(0.1, 5.0), (0.0, math.pi)]
    g = TaskGenerator(box, noise_dim=4, hidden=16, gen=torch.Generator().manual_seed(0))
    params = g(torch.randn(4000, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)).detach()
    for j, (lo, hi) in enumerate(box):
        assert lo <= float(params[:, j].min()) and float(params[:, j].max()) <= hi
        unit = (params[:, j] - lo) / (hi - lo)
        # close to the uniform prior the direct arm samples: mean 1/2, standard deviation 1/sqrt(12) = 0.289
        assert abs(float(unit.mean()) - 0.5) < 0.05 and abs(float(unit.std()) - 0.289) < 0.04


def test_the_post_adaptation_loss_is_differentiable_in_the_task_parameters_and_matches_finite_differences() -> None:
    stage, exp = _stage(ADVERSARIAL)
    meta = {k: v.double() for k, v in exp.initial_meta_params().items()}
    params = torch.tensor([[2.0, 0.5], [4.0, 2.0], [0.3, 1.0]], dtype=torch.float64, requires_grad=True)

    def losses(p: torch.Tensor) -> torch.Tensor:  # the same inputs every call: the stream restarts
        tasks = stage.family.make_tasks(p, torch.Generator().manual_seed(3)).to("cpu", torch.float64)
        return post_adaptation_losses(exp.algorithm, meta, tasks)

    value = losses(params)
    (analytic,) = torch.autograd.grad(value.sum(), params)
    # independent reference: one inner SGD step on the MSE, written out by hand, for each task
    tasks = stage.family.make_tasks(params.detach(), torch.Generator().manual_seed(3)).to("cpu", torch.float64)
    for t in range(3):
        m = {k: v.clone().requires_grad_(True) for k, v in meta.items()}
        support = torch.nn.functional.mse_loss(exp.algorithm.model.forward(m, tasks.support_x[t]), tasks.support_y[t])
        grads = torch.autograd.grad(support, list(m.values()))
        fast = {k: v - exp.cfg.meta.inner_lr * g for (k, v), g in zip(m.items(), grads)}
        query = torch.nn.functional.mse_loss(exp.algorithm.model.forward(fast, tasks.query_x[t]), tasks.query_y[t])
        assert float(query.detach()) == pytest.approx(float(value[t].detach()), rel=1e-10)
    eps = 1e-6
    for i in range(3):
        for j in range(2):
            up, down = params.detach().clone(), params.detach().clone()
            up[i, j] += eps
            down[i, j] -= eps
            numeric = float((losses(up).sum() - losses(down).sum()) / (2 * eps))
            assert abs(float(analytic[i, j]) - numeric) < 1e-6 * max(1.0, abs(numeric))


def test_the_generator_ascends_towards_harder_tasks() -> None:
    stage, exp = _stage({**ADVERSARIAL, "adversarial": {"candidates": 16, "steps": 1, "lr": 0.1}})
    meta = exp.initial_meta_params()
    z = torch.randn(16, 4, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    before, _ = stage.objective(meta, z, torch.Generator().manual_seed(5))
    for r in range(6):
        stage.propose(r, meta)
    after, _ = stage.objective(meta, z, torch.Generator().manual_seed(5))
    assert float(after) > float(before)


def test_the_filter_admits_hard_novel_tasks_hardest_first() -> None:
    stage, _ = _stage({**ADVERSARIAL, "adversarial": {"min_gap": 2.0, "min_distance": 0.1}})
    params = torch.tensor([[1.0, 1.0], [4.9, 1.0], [4.8, 1.05], [3.0, 3.0], [2.0, 0.1]], dtype=torch.float64)
    difficulty = torch.tensor([0.5, 9.0, 8.0, 6.0, 3.0], dtype=torch.float64)
    # 0: too easy (< 2 x 1.0); 2: too close to 1 once 1 is in; 4 is hard enough but sits next to the memory
    stage.memory = stage.generator.normalize(torch.tensor([[2.0, 0.15]], dtype=torch.float64))
    assert stage.admit(params, difficulty, reference=1.0) == [1, 3]


def test_the_stage_mixes_only_admitted_tasks_and_logs_its_signatures() -> None:
    stage, exp = _stage(ADVERSARIAL)
    meta = exp.initial_meta_params()
    clients = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1)) for k, v in meta.items()}
    state = RoundState(1, meta, [], aggregate=dict(clients))
    stage(state)
    info = state.info["generators"]
    assert 1 <= info["mixed"] <= min(4, info["admitted"]) and info["weight"] == pytest.approx(0.4)
    assert info["admitted_difficulty"] >= info["known_difficulty"]
    assert info["failures"] == [] and info["violation"] == 0.0
    assert len(stage.memory) == info["mixed"]
    # nothing admitted (an impossible difficulty gap): nothing mixed in, collapse logged
    strict, _ = _stage({**ADVERSARIAL, "adversarial": {**ADVERSARIAL["adversarial"], "min_gap": 1e9}})
    state = RoundState(1, meta, [], aggregate=dict(clients))
    strict(state)
    assert state.info["generators"]["weight"] == 0.0 and state.info["generators"]["failures"] == ["collapse"]
    assert all(torch.equal(state.aggregate[k], clients[k]) for k in clients)


def test_manifold_drift_fires_for_an_unconstrained_generator_and_damping_recovers(tmp_path: Path) -> None:
    # the box reaches amplitude 50, the declared output bound is 5, and the generator is not told to respect it
    broken = {
        **ADVERSARIAL,
        "family": {"amplitude": [0.1, 50.0]},
        "constraints": [{"kind": "bounded", "bound": 5.0, "weight": 1.0}],
        "adversarial": {**ADVERSARIAL["adversarial"], "penalty": 0.0},
        "on_failure": "damp",
    }
    run_centralized(_cfg(broken, meta={"tasks_per_client": 2, "inner_lr": 0.001}), tmp_path / "broken")
    rows = [r["generators"] for r in _rows(tmp_path / "broken") if "generators" in r]
    assert all("drift" in r["failures"] for r in rows) and all(r["violation"] > 0.1 for r in rows)
    assert [r["weight"] for r in rows] == pytest.approx([0.2, 0.1, 0.05, 0.025])
    # told the bound (its penalty weighted above the loss, which also grows as amplitude squared), the same
    # generator's proposals move back inside it
    told = {**broken, "adversarial": {**broken["adversarial"], "penalty": 10.0}}
    stage, exp = _stage(told)
    meta = exp.initial_meta_params()
    z = torch.randn(64, 4, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    start = float(stage.violation(stage.generator(z)).mean())
    for r in range(8):
        stage.propose(r, meta)
    assert float(stage.violation(stage.generator(z)).mean()) < start


def test_epsilon_is_the_same_with_and_without_the_adversarial_generator(tmp_path: Path) -> None:
    dp = {"privacy": {"mode": "client-central", "noise_seed": 5}, "federation": {
        "clients_total": 40, "clients_per_round": 4, "rounds": 3, "sampling": "poisson"}}
    plain = run_centralized(_cfg(**dp), tmp_path / "plain")
    mixed = run_centralized(_cfg(ADVERSARIAL, **dp), tmp_path / "mixed")
    assert "epsilon" in json.dumps(plain["privacy"]) and plain["privacy"] == mixed["privacy"]
    a, b = _rows(tmp_path / "plain"), _rows(tmp_path / "mixed")
    assert [r.get("privacy") for r in a] == [r.get("privacy") for r in b]
    assert a[-1]["update_norm"] != b[-1]["update_norm"]  # the generator did act


def test_a_resumed_adversarial_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    gen = {**ADVERSARIAL, "adversarial": {**ADVERSARIAL["adversarial"], "discriminator": 0.5}}
    run_centralized(_cfg(gen), tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_after_two(round_idx: int, row: dict[str, Any]) -> None:
        if round_idx == 2:
            raise Stop

    with pytest.raises(Stop):
        run_centralized(_cfg(gen), tmp_path / "parts", progress=stop_after_two)
    run_centralized(_cfg(gen), tmp_path / "parts", resume=True)
    whole = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=False)
    parts = torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)
    assert all(torch.equal(whole["meta_params"][k], parts["meta_params"][k]) for k in whole["meta_params"])
    w = [r["generators"] for r in _rows(tmp_path / "whole") if "generators" in r]
    p = [r["generators"] for r in _rows(tmp_path / "parts") if "generators" in r]
    assert w == p and len(w) == 4 and all("realism" in r for r in w)
    # the pictures' records: the proposals on evaluation rounds (eval.every 2), the error by amplitude in evaluations
    rows = _rows(tmp_path / "whole")
    maps = {r["round"]: r["generators"]["map"] for r in rows if "map" in r.get("generators", {})}
    assert sorted(maps) == [2, 4] and all(len(m["params"]) == len(m["difficulty"]) == 8 for m in maps.values())
    assert all(sum(m["admitted"]) == r["generators"]["admitted"] for r in rows for m in [maps.get(r["round"])] if m)
    curves = [r["eval"]["by_param"] for r in rows if "eval" in r]
    assert len(curves) == 3 and all(c["name"] == "amplitude" and sum(c["tasks"]) == 10 for c in curves)
    assert (tmp_path / "whole" / "task_space.png").stat().st_size > 0
    assert (tmp_path / "whole" / "error_by_param.png").stat().st_size > 0
