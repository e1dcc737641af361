"""The centralized reference learns, reproduces itself, resumes, and writes the output contract."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import config_from_dict
from fedmeta.outputs import read_metrics


def _cfg(task: str = "sinusoid", seed: int = 1, **over):
    data = {
        "seed": seed,
        "task": {"name": task, "shots": 10, "query": 10},
        "meta": {"algorithm": "maml", "inner_lr": 0.01, "outer_lr": 0.003},
        "federation": {"clients_total": 200, "clients_per_round": 10, "rounds": 300},
        "eval": {"tasks": 200, "steps": 10, "every": 100},
    }
    for key, value in over.items():
        section, name = key.split("__")
        data.setdefault(section, {})[name] = value
    return config_from_dict(data)


@pytest.mark.parametrize("task", ["sinusoid", "harmonic"])
def test_short_run_halves_heldout_loss(tmp_path: Path, task: str) -> None:
    """300 MAML iterations: post-adaptation loss on held-out tasks far below pre-adaptation."""
    summary = run_centralized(_cfg(task), tmp_path)
    final = summary["final"]
    assert final["post_adapt_loss"] < 0.5 * final["pre_adapt_loss"]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows[0]["round"] == 0 and rows[-1]["round"] == 300
    assert rows[-1]["eval"]["post_adapt_loss"] < rows[0]["eval"]["post_adapt_loss"]


def test_output_contract(tmp_path: Path) -> None:
    summary = run_centralized(_cfg(federation__rounds=20, eval__every=10), tmp_path)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk["rounds_completed"] == 20
    for key in (
        "algorithm",
        "rounds_completed",
        "clients_total",
        "clients_per_round",
        "final",
        "privacy",
        "wall_seconds",
    ):
        assert key in on_disk
    for key in ("pre_adapt_loss", "post_adapt_loss"):
        assert isinstance(on_disk["final"][key], float)
    assert on_disk["privacy"]["epsilon"] is None and on_disk["privacy"]["delta"] == 1e-5
    assert summary["final"] == on_disk["final"]
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["round"] for r in rows] == list(range(21))
    assert (tmp_path / "learning_curves.png").stat().st_size > 1000
    assert (tmp_path / "adaptation_curve.png").stat().st_size > 1000
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    assert state["round"] == 20 and state["config"]["federation"]["rounds"] == 20 and state["optimizer"]


def test_same_config_same_result_other_seed_other_result(tmp_path: Path) -> None:
    a = run_centralized(_cfg(federation__rounds=15, eval__every=15), tmp_path / "a")
    b = run_centralized(_cfg(federation__rounds=15, eval__every=15), tmp_path / "b")
    assert a["final"] == b["final"]
    ca, cb = load_checkpoint(tmp_path / "a/checkpoint.pt"), load_checkpoint(tmp_path / "b/checkpoint.pt")
    assert all(torch.equal(ca["meta_params"][k], cb["meta_params"][k]) for k in ca["meta_params"])
    c = run_centralized(_cfg(seed=2, federation__rounds=15, eval__every=15), tmp_path / "c")
    assert c["final"]["post_adapt_loss"] != a["final"]["post_adapt_loss"]


def test_resume_continues_exactly(tmp_path: Path) -> None:
    full = run_centralized(_cfg(federation__rounds=30, eval__every=10), tmp_path / "full")
    run_centralized(_cfg(federation__rounds=20, eval__every=10), tmp_path / "part")
    resumed = run_centralized(_cfg(federation__rounds=30, eval__every=10), tmp_path / "part", resume=True)
    assert resumed["final"] == full["final"]
    rounds = [r["round"] for r in read_metrics(tmp_path / "part/metrics.jsonl")]
    assert rounds == list(range(31))


@pytest.mark.parametrize("algorithm", ["fomaml", "reptile", "metasgd", "anil", "fedavg"])
def test_every_algorithm_trains(tmp_path: Path, algorithm: str) -> None:
    over = {"meta__algorithm": algorithm, "federation__rounds": 60, "eval__every": 60, "eval__tasks": 100}
    if algorithm == "reptile":
        over.update(meta__inner_steps=5, meta__outer_optimizer="sgd", meta__outer_lr=1.0, meta__inner_lr=0.02)
    summary = run_centralized(_cfg(**over), tmp_path)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert summary["final"]["post_adapt_loss"] < rows[0]["eval"]["post_adapt_loss"]
