"""Virtual tasks, direct (issue 17): the stage mixes the run's own meta-gradient on server-drawn tasks
into the aggregate after the privacy mechanism; depth 1 is the plain run; ε does not move; the
failure signatures act as configured; a resumed run equals an uninterrupted one."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmeta.algorithms.engine import PerTaskOps
from fedmeta.centralized import run_centralized
from fedmeta.config import Config, config_from_dict
from fedmeta.errors import ConfigError
from fedmeta.experiment import Experiment
from fedmeta.federation.stages import RoundState
from fedmeta.generators.virtual import GeneratorFailure, VirtualTaskStage, generator_stages

NARROW = {"name": "sinusoid", "amplitude": [0.1, 1.05]}
DIRECT = {"mode": "direct", "depth": 2, "weight": 0.4, "tasks": 6, "family": {"amplitude": [0.1, 5.0]}}


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
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for row in rows:
        row.pop("timing", None)
        row.pop("seconds", None)
    return rows


def test_depth_one_builds_no_stage_and_is_the_plain_run(tmp_path: Path) -> None:
    cfg = _cfg({"mode": "none", "depth": 1, "weight": 0.7})
    assert generator_stages(cfg, Experiment(cfg), rounds=4) == []
    run_centralized(_cfg(), tmp_path / "plain")
    run_centralized(cfg, tmp_path / "none")
    assert _rows(tmp_path / "plain") == _rows(tmp_path / "none")


def test_the_stage_mixes_the_virtual_meta_gradient_in_and_it_matches_finite_differences() -> None:
    cfg = _cfg(DIRECT)
    exp = Experiment(cfg)
    stage = VirtualTaskStage(cfg, exp, rounds=4)
    meta = {k: v.double() for k, v in exp.initial_meta_params().items()}
    tasks = stage.virtual_tasks(3)
    assert float(tasks.params[:, 0].max()) > 1.05  # drawn from generators.family, not the clients' band
    clients = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
               for k, v in meta.items()}
    state = RoundState(3, meta, [], aggregate=dict(clients))
    stage(state)
    virtual = stage.virtual_gradient(meta, tasks.to("cpu", torch.float64))
    for k in meta:
        assert torch.allclose(state.aggregate[k], 0.6 * clients[k] + 0.4 * virtual[k], atol=1e-12)
    assert state.info["generators"]["weight"] == pytest.approx(0.4)
    # the virtual meta-gradient is the gradient of the virtual tasks' mean MAML objective (float64)
    t64 = tasks.to("cpu", torch.float64)
    ops = PerTaskOps(exp.algorithm)

    def objective(m: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.stack([
            exp.algorithm.objective(ops, m, t64.support_x[t], t64.support_y[t], t64.query_x[t], t64.query_y[t])[0]
            for t in range(t64.num_tasks)
        ]).mean()

    gen, eps = torch.Generator().manual_seed(2), 1e-6
    for _ in range(2):
        v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in meta.items()}
        numeric = float((objective({k: meta[k] + eps * v[k] for k in meta})
                         - objective({k: meta[k] - eps * v[k] for k in meta})) / (2 * eps))
        analytic = float(sum((virtual[k] * v[k]).sum() for k in meta))
        assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric))


def test_epsilon_is_the_same_with_and_without_virtual_tasks(tmp_path: Path) -> None:
    dp = {"privacy": {"mode": "client-central", "noise_seed": 5}, "federation": {
        "clients_total": 40, "clients_per_round": 4, "rounds": 3, "sampling": "poisson"}}
    plain = run_centralized(_cfg(**dp), tmp_path / "plain")
    mixed = run_centralized(_cfg(DIRECT, **dp), tmp_path / "mixed")
    assert "epsilon" in json.dumps(plain["privacy"]) and plain["privacy"] == mixed["privacy"]
    a, b = _rows(tmp_path / "plain"), _rows(tmp_path / "mixed")
    assert [r.get("privacy") for r in a] == [r.get("privacy") for r in b]
    assert a[-1]["update_norm"] != b[-1]["update_norm"]


def test_failure_signatures_warn_damp_or_stop(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    touchy = {**DIRECT, "max_norm_ratio": 1e-6}  # every round's ratio counts as an explosion
    with caplog.at_level("WARNING", logger="fedmeta"):
        run_centralized(_cfg({**touchy, "on_failure": "damp"}), tmp_path / "damp")
    weights = [r["generators"]["weight"] for r in _rows(tmp_path / "damp") if "generators" in r]
    assert weights == pytest.approx([0.2, 0.1, 0.05, 0.025])
    assert all(r["generators"]["failures"] == ["explosion"] for r in _rows(tmp_path / "damp") if "generators" in r)
    assert any("generator failure signature explosion" in r.getMessage() for r in caplog.records)
    with pytest.raises(GeneratorFailure, match="round 1: generator failure signature explosion.*'stop'"):
        run_centralized(_cfg({**touchy, "on_failure": "stop"}), tmp_path / "stop")


def test_a_resumed_run_equals_an_uninterrupted_one(tmp_path: Path) -> None:
    gen = {**DIRECT, "max_norm_ratio": 1e-6, "on_failure": "damp", "schedule": "linear", "weight_final": 0.1}
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
    assert [x["weight"] for x in w] == [x["weight"] for x in p]  # the damping was restored with the checkpoint
    assert len(w) == 4


@pytest.mark.parametrize(
    ("generators", "task", "match"),
    [
        ({"mode": "direct"}, NARROW, "generators.depth' must be 2"),
        ({"depth": 2}, NARROW, "generators.mode' must name a generator"),
        ({**DIRECT, "mode": "adversarial", "adversarial": {"candidates": 1}}, NARROW,
         "generators.adversarial.candidates' must be at least 2"),
        ({**DIRECT, "mode": "adversarial", "adversarial": {"noise_dim": 1}}, NARROW,
         "generators.adversarial.noise_dim' must be at least the number of task parameters"),
        ({**DIRECT, "mode": "adversarial", "adversarial": {"min_distance": 2.0}}, NARROW,
         "generators.adversarial.min_distance' must be in"),
        ({**DIRECT, "weight": 1.5}, NARROW, "generators.weight' must be in"),
        ({**DIRECT, "family": {"amplitude": [5.0, 1.0]}}, NARROW, "generators.family.amplitude"),
        ({**DIRECT, "on_failure": "ignore"}, NARROW, "generators.on_failure"),
        ({**DIRECT, "family": {}}, {"name": "glyphs"}, "'direct' samples virtual tasks from a generated family"),
    ],
)
def test_bad_generator_settings_are_refused_naming_the_key(
    generators: dict[str, Any], task: dict[str, Any], match: str
) -> None:
    data: dict[str, Any] = {"task": task, "generators": generators}
    if task["name"] == "glyphs":
        data["model"] = {"name": "conv4"}
    with pytest.raises(ConfigError, match=match):
        config_from_dict(data)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_cuda_without_a_gpu_is_refused_and_auto_falls_back_to_the_cpu() -> None:
    from fedmeta.generators.virtual import resolve_device

    assert resolve_device("auto").type == "cpu"
    with pytest.raises(ConfigError, match="generators.device' is 'cuda'"):
        resolve_device("cuda")
