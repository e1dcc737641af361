"""What a client computes and sends under each DP mode, and how it keeps its accountant."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmeta.config import Config, config_from_dict
from fedmeta.errors import BudgetExhausted, CheckpointError
from fedmeta.experiment import Experiment
from fedmeta.local_update import local_meta_update
from fedmeta.privacy.client_update import (
    client_state_path,
    load_client_state,
    nominal_num_tasks,
    private_client_update,
    private_round,
    save_client_state,
)
from fedmeta.privacy.clipping import clip_by_global_norm, global_l2_norm
from fedmeta.privacy.facade import ClientPrivacy
from tests.privacy_helpers import opacus_rdp_epsilon


def _cfg(mode: str, **over: Any) -> Config:
    data: dict[str, Any] = {
        "seed": 4,
        "task": {"name": "sinusoid", "shots": 5, "query": 5, "tasks_per_site": 8},
        "model": {"hidden": [16, 16]},
        "meta": {"algorithm": "maml", "tasks_per_client": 3},
        "federation": {
            "clients_total": 10,
            "clients_per_round": 4,
            "rounds": 20,
            "sampling": "poisson" if mode == "client-central" else "uniform",
        },
        "privacy": {"mode": mode, "noise_seed": 5, "clip_norm": 0.3, "noise_multiplier": 1.0},
    }
    for key, value in over.items():
        section, name = key.split("__")
        data[section][name] = value
    return config_from_dict(data)


@pytest.mark.parametrize("mode", ["none", "client-central", "client-local", "task"])
def test_a_dp_client_sends_only_the_update_a_nominal_task_count_and_privacy_scalars(mode: str) -> None:
    cfg = _cfg(mode)
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    raw = exp.client_update(meta, 1, 2)
    client = ClientPrivacy.for_site(cfg, 2, exp.source)
    update, metrics = private_client_update(exp, meta, 1, 2, client, clip_norm=0.3)
    if mode == "none":
        assert update.metrics == raw.metrics and metrics == {} and update.num_tasks == 3
        return
    assert update.metrics == {} and update.num_tasks == nominal_num_tasks(cfg) == 3
    assert all(k.startswith("privacy.") for k in metrics)
    if mode == "client-central":  # the trusted server clips and noises
        assert metrics == {} and all(torch.equal(update.gradient[k], raw.gradient[k]) for k in raw.gradient)
    else:
        assert {"privacy.epsilon", "privacy.delta", "privacy.steps"} <= set(metrics)
        assert metrics["privacy.steps"] == 1.0
    if mode == "client-local":
        residual = {k: update.gradient[k] - clip_by_global_norm(raw.gradient, 0.3)[0][k] for k in raw.gradient}
        flat = torch.cat([v.flatten() for v in residual.values()])
        assert float(flat.std()) == pytest.approx(0.3, rel=0.1)  # N(0, (z C)^2), z = 1, ~600 parameters


def test_private_round_keeps_the_accountant_across_runs_in_a_state_dir(tmp_path: Path) -> None:
    cfg = _cfg("client-local")
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    state: dict[str, Any] | None = None
    for r in (1, 2):
        _, metrics, state = private_round(exp, meta, r, 3, state=state, state_dir=tmp_path)
    # a new run (fresh node memory) picks the accountant up from the site's folder
    _, metrics, state = private_round(exp, meta, 3, 3, state=None, state_dir=tmp_path)
    assert state["steps"] == [3] and metrics["privacy.steps"] == 3.0
    assert metrics["privacy.epsilon"] == pytest.approx(opacus_rdp_epsilon(0.5, 1.0, 3), rel=1e-6)
    assert load_client_state(tmp_path, 3, "client-local") == state
    assert load_client_state(tmp_path, 3, "task") is None and load_client_state(tmp_path, 4, "client-local") is None
    path = client_state_path(tmp_path, 3, "client-local")
    path.write_text(json.dumps({"client_id": 9, "mode": "client-local", "state": {}}))
    with pytest.raises(CheckpointError, match="belongs to another client"):
        load_client_state(tmp_path, 3, "client-local")
    path.write_text("{not json")
    with pytest.raises(CheckpointError, match="cannot be read"):
        load_client_state(tmp_path, 3, "client-local")
    save_client_state(tmp_path, 3, "client-local", state)
    assert load_client_state(tmp_path, 3, "client-local") == state


def test_task_mode_local_steps_are_dp_sgd_steps_whose_sum_is_sent() -> None:
    # sigma = 0, a huge clip norm and q = 1 (every task of the pool in every step): the K private
    # steps are exactly FedMeta-style local meta-steps on the site's whole pool
    cfg = _cfg(
        "task",
        meta__tasks_per_client=8,
        meta__local_steps=2,
        meta__local_lr=0.05,
        privacy__noise_multiplier=0.0,
        privacy__clip_norm=1e9,
    )
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    update, report = private_client_update(exp, meta, 5, 1, ClientPrivacy.for_site(cfg, 1, exp.source))
    twin = ClientPrivacy.for_site(cfg, 1, exp.source)  # the same secret draws (noise seed fixed)
    first = twin.sample_tasks(exp.source, 5)
    twin.privatize_task_gradients(None, reference=meta, round_idx=5)  # advance to the second step's draws
    second = twin.sample_tasks(exp.source, 5)
    assert first is not None and second is not None and first.num_tasks == second.num_tasks == 8
    expected = local_meta_update(exp.algorithm, meta, [first, second], lr=0.05)
    for k in meta:
        torch.testing.assert_close(update.gradient[k], expected.gradient[k], rtol=1e-4, atol=1e-6)
    assert report["privacy.steps"] == 2.0 and update.num_tasks == 16


def test_task_mode_site_epsilon_counts_every_local_step_against_opacus() -> None:
    cfg = _cfg("task", meta__local_steps=2, privacy__noise_multiplier=1.3, privacy__clip_norm=0.5)
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    state = None
    for r in range(1, 4):
        update, report, state = private_round(exp, meta, r, 0, state=state)
        assert global_l2_norm(update.gradient) > 0
    assert report["privacy.epsilon"] == pytest.approx(opacus_rdp_epsilon(1.3, 3 / 8, 6), rel=1e-6)
    assert "privacy.sample_rate" not in report and state["steps"] == [6] and state["sample_rates"][0] == 3 / 8


def test_a_site_refuses_a_round_whose_local_steps_do_not_all_fit_before_taking_any() -> None:
    one = opacus_rdp_epsilon(1.0, 3 / 8, 1)
    cfg = _cfg("task", meta__local_steps=2, privacy__target_epsilon=one * 1.05)
    exp = Experiment(cfg)
    client = ClientPrivacy.for_site(cfg, 0, exp.source)
    with pytest.raises(BudgetExhausted, match="this round's 2 local steps would reach"):
        private_client_update(exp, exp.initial_meta_params(), 1, 0, client)
    assert client.site is not None and client.site.accountant.steps == 0  # nothing was released


def test_flower_node_state_keeps_an_accountant_including_an_empty_one() -> None:
    from flwr.app import Context, RecordDict
    from flwr.common.serde import recorddict_from_proto, recorddict_to_proto

    from fedmeta.flower import records as fl

    ctx = Context(run_id=1, node_id=2, node_config={}, state=RecordDict(), run_config={})
    assert fl.load_node_state(ctx, fl.PRIVACY_STATE) is None
    cfg = _cfg("client-local")
    fresh = ClientPrivacy(cfg, 0).state_dict()
    assert fresh["steps"] == []
    fl.store_node_state(ctx, fl.PRIVACY_STATE, fresh)
    ctx.state = recorddict_from_proto(recorddict_to_proto(ctx.state))  # as a deployment node stores it
    assert fl.load_node_state(ctx, fl.PRIVACY_STATE) == fresh
    used = ClientPrivacy(cfg, 0, state=fl.load_node_state(ctx, fl.PRIVACY_STATE))
    used.privatize_update({"w": torch.ones(3)}, round_idx=1)
    fl.store_node_state(ctx, fl.PRIVACY_STATE, used.state_dict())
    ctx.state = recorddict_from_proto(recorddict_to_proto(ctx.state))
    again = ClientPrivacy(cfg, 0, state=fl.load_node_state(ctx, fl.PRIVACY_STATE))
    assert again.accountant is not None and again.accountant.history == [(0.5, 1.0, 1)]
    assert again.epsilon() == pytest.approx(opacus_rdp_epsilon(0.5, 1.0, 1), rel=1e-6)


def test_a_shared_rdp_cache_serves_the_accountant_rebuilt_every_round_without_changing_epsilon() -> None:
    cfg = _cfg("task", privacy__noise_multiplier=1.3)
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    cache: dict = {}
    shared = alone = None
    for r in range(1, 4):
        _, with_cache, shared = private_round(exp, meta, r, 0, state=shared, rdp_cache=cache)
        _, without, alone = private_round(exp, meta, r, 0, state=alone)
        assert with_cache["privacy.epsilon"] == without["privacy.epsilon"]
    assert list(cache) == [(1.3, 3 / 8)]  # one curve, computed once for three rebuilt accountants
    assert with_cache["privacy.epsilon"] == pytest.approx(opacus_rdp_epsilon(1.3, 3 / 8, 3), rel=1e-6)
