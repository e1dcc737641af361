"""TRLearner's federated variant (issue 18): relation weights over the clients' updates as defined,
a function of the received updates only, post-processing under the modes whose updates arrive
privatized (ε unchanged) and refused where they do not."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedmeta.aggregation import build_aggregator
from fedmeta.aggregation.relations import RelationWeighted, client_relations
from fedmeta.config import config_from_dict
from fedmeta.errors import ConfigError


def _updates(seed: int = 0, clients: int = 5) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    common = {
        "w": torch.randn(3, 4, generator=gen, dtype=torch.float64),
        "b": torch.randn(4, generator=gen, dtype=torch.float64),
    }
    return {k: v + 0.3 * torch.randn(clients, *v.shape, generator=gen, dtype=torch.float64) for k, v in common.items()}


def test_relations_are_as_defined_and_weights_sum_to_one() -> None:
    updates = _updates()
    tau = 0.5
    m = client_relations(updates, temperature=tau)
    c = 5
    for i in range(c):
        sims = []
        for j in range(c):
            cos = [float((v[i] * v[j]).sum() / (v[i].norm() * v[j].norm())) for v in updates.values()]
            sims.append(sum(cos) / len(cos))
        z = sum(math.exp(sims[j] / tau) for j in range(c) if j != i)
        for j in range(c):
            want = 0.0 if j == i else math.exp(sims[j] / tau) / z
            assert float(m[i, j]) == pytest.approx(want, rel=1e-12, abs=1e-15)
    rule = RelationWeighted("weights", temperature=tau)
    w = rule.client_weights(updates)
    assert float(w.sum()) == pytest.approx(1.0, rel=1e-12)
    agg = rule.aggregate(updates, torch.ones(c, dtype=torch.float64))
    assert torch.allclose(agg["w"], torch.einsum("c,cij->ij", w, updates["w"]))
    # consistency with λ: the plain mean pulled λ of the way to the relation-weighted aggregate
    half = RelationWeighted("consistency", temperature=tau, pull=0.25).aggregate(updates, torch.ones(c))
    assert torch.allclose(half["w"], 0.75 * updates["w"].mean(dim=0) + 0.25 * agg["w"], atol=1e-12)


def test_an_update_unlike_the_others_counts_less_and_declared_task_counts_do_not_matter() -> None:
    updates = _updates(clients=6)
    updates = {k: v.clone() for k, v in updates.items()}
    for v in updates.values():
        v[2] = -5 * v[2]  # a sign-flipped, scaled client
    rule = RelationWeighted("weights", temperature=0.2)
    w = rule.client_weights(updates)
    assert int(w.argmin()) == 2 and float(w[2]) < 0.5 / 6
    claims = torch.tensor([1, 1, 10**6, 1, 1, 1], dtype=torch.float64)
    a, b = rule.aggregate(updates, torch.ones(6)), rule.aggregate(updates, claims)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_variant_is_chosen_by_its_key_and_refused_where_updates_arrive_raw() -> None:
    base = {"task": {"name": "sinusoid"}, "meta": {"trlearner": {"federated": "weights"}}}
    assert isinstance(build_aggregator(config_from_dict(base)), RelationWeighted)
    with pytest.raises(ConfigError, match="meta.trlearner.federated.*'off' for privacy.mode 'client-central'"):
        config_from_dict({**base, "privacy": {"mode": "client-central"}, "federation": {"sampling": "poisson"}})
    with pytest.raises(ConfigError, match="federation.aggregation' must be 'mean' with meta.trlearner.federated"):
        config_from_dict({**base, "federation": {"aggregation": "median"}})
    with pytest.raises(ConfigError, match="meta.trlearner.federated' must be one of"):
        config_from_dict({"meta": {"trlearner": {"federated": "yes"}}})
    with pytest.raises(ConfigError, match="meta.trlearner.weight' must be in \\[0, 1\\]"):
        config_from_dict({"meta": {"trlearner": {"federated": "consistency", "weight": 2.0}}})


def _run(tmp_path: Path, name: str, federated: str) -> tuple[list[dict[str, object]], dict[str, object]]:
    from fedmeta.centralized import run_centralized

    cfg = config_from_dict({
        "task": {"name": "sinusoid"},
        "meta": {"trlearner": {"federated": federated}},
        "federation": {"clients_total": 8, "clients_per_round": 4, "rounds": 3},
        "privacy": {"mode": "client-local", "noise_seed": 3, "clip_norm": 1.0, "noise_multiplier": 1.0},
        "eval": {"tasks": 8, "every": 3, "steps": 2},
    })
    summary = run_centralized(cfg, tmp_path / name)
    rows = [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return rows, summary


def test_under_client_local_dp_it_is_post_processing_epsilon_unchanged(tmp_path: Path) -> None:
    """The clients noise their own updates; weighting them on the server changes the model, never ε."""
    plain_rows, plain = _run(tmp_path, "plain", "off")
    rel_rows, rel = _run(tmp_path, "rel", "weights")
    assert "epsilon" in json.dumps(plain["privacy"])
    assert plain["privacy"] == rel["privacy"]
    assert [r.get("privacy") for r in plain_rows] == [r.get("privacy") for r in rel_rows]
    assert plain_rows[-1]["update_norm"] != rel_rows[-1]["update_norm"]
