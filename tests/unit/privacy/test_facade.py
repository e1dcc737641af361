"""The server and client privacy facades: each mode's aggregate, accounting, budget and checkpoint."""

from __future__ import annotations

import io
import math
from typing import Any

import pytest
import torch

from fedmeta.config import Config, config_from_dict
from fedmeta.errors import BudgetExhausted, CheckpointError
from fedmeta.experiment import Experiment
from fedmeta.optim import ServerOptimizer
from fedmeta.privacy import releasable_metrics
from fedmeta.privacy.accountant import epsilon_for
from fedmeta.privacy.clipping import clip_by_global_norm, clipped_sum, global_l2_norm
from fedmeta.privacy.facade import CLIP_BIT_KEY, CLIP_NORM_KEY, ClientPrivacy, ServerPrivacy
from fedmeta.rng import make_generator
from fedmeta.types import Params
from tests.privacy_helpers import opacus_rdp_epsilon


def _cfg(mode: str, *, total: int = 40, per_round: int = 10, rounds: int = 20, **privacy: Any) -> Config:
    return config_from_dict(
        {
            "seed": 5,
            "task": {"name": "sinusoid", "shots": 5, "query": 5},
            "model": {"hidden": [16, 16]},
            "meta": {"algorithm": "maml", "outer_optimizer": "sgd", "outer_lr": 0.01},
            "federation": {
                "clients_total": total,
                "clients_per_round": per_round,
                "rounds": rounds,
                "sampling": "poisson",
            },
            "privacy": {"mode": mode, **privacy},
            "eval": {"every": 5},
        }
    )


def _updates(n: int, seed: int, scale: float = 1.0) -> list[Params]:
    gen = make_generator(seed, "updates")
    return [
        {"w": scale * torch.randn(30, generator=gen), "lr.w": scale * torch.randn(30, generator=gen)} for _ in range(n)
    ]


REF = {"w": torch.zeros(30), "lr.w": torch.zeros(30)}


# -- client-central ----------------------------------------------------------------------------


def test_central_aggregate_is_clipped_sum_plus_calibrated_noise_over_expected_cohort() -> None:
    cfg = _cfg("client-central", clip_norm=0.7, noise_multiplier=0.0, noise_seed=1)
    server = ServerPrivacy(cfg)
    updates = _updates(7, 0, scale=2.0)
    out = server.aggregate(1, updates, reference=REF)
    total, _ = clipped_sum(updates, 0.7, reference=REF)
    for k in REF:  # sigma = 0: exactly the clipped sum over the *expected* cohort (10), not 7
        torch.testing.assert_close(out[k], total[k] / 10)
    # with noise: (aggregate x 10 - clipped sum) is N(0, (z C)^2) noise, repeatable under the seed
    big = {"w": torch.zeros(50_000)}
    big_updates = [{"w": torch.randn(50_000, generator=make_generator(i, "u"))} for i in range(5)]
    noisy = ServerPrivacy(_cfg("client-central", clip_norm=0.7, noise_multiplier=1.3, noise_seed=1))
    a = noisy.aggregate(3, big_updates, reference=big)["w"]
    b = ServerPrivacy(_cfg("client-central", clip_norm=0.7, noise_multiplier=1.3, noise_seed=1)).aggregate(
        3, big_updates, reference=big
    )["w"]
    assert torch.equal(a, b)
    residual = a * 10 - clipped_sum(big_updates, 0.7, reference=big)[0]["w"]
    assert float(residual.std()) == pytest.approx(1.3 * 0.7, rel=0.02)
    assert abs(float(residual.mean())) < 5 * 1.3 * 0.7 / math.sqrt(50_000)


def test_central_sampling_is_poisson_from_a_secret_seed() -> None:
    cfg = _cfg("client-central", total=1000, per_round=100)
    a, b = ServerPrivacy(cfg), ServerPrivacy(cfg)
    cohorts = [a.sample_clients(r) for r in range(1, 201)]
    sizes = torch.tensor([len(c) for c in cohorts], dtype=torch.float64)
    assert float(sizes.mean()) == pytest.approx(100, abs=3)  # Binomial(1000, 0.1): SE of the mean 0.67
    assert float(sizes.std()) > 5  # the cohort size varies: not a fixed-size draw
    assert b.sample_clients(1) != cohorts[0]  # a fresh secret seed: not recomputable from the config
    fixed = _cfg("client-central", total=1000, per_round=100, noise_seed=4)
    assert ServerPrivacy(fixed).sample_clients(7) == ServerPrivacy(fixed).sample_clients(7)


def test_central_epsilon_each_round_equals_opacus_and_survives_a_resume() -> None:
    cfg = _cfg("client-central", clip_norm=1.0, noise_multiplier=1.1, noise_seed=2, rounds=12)
    q = 10 / 40
    full = ServerPrivacy(cfg)
    first = ServerPrivacy(cfg)
    rows, aggs = [], []
    for r in range(1, 13):
        ups = _updates(len(full.sample_clients(r)), r)
        aggs.append(full.aggregate(r, ups, reference=REF))
        rows.append(full.finish_round(r, sampled=full.sample_clients(r)))
        if r <= 7:
            first.aggregate(r, ups, reference=REF)
            first.finish_round(r, sampled=[])
    for r, row in enumerate(rows, start=1):
        assert row["epsilon"] == pytest.approx(opacus_rdp_epsilon(1.1, q, r), rel=1e-6)
        assert row["sample_rate"] == q and row["steps"] == r and row["delta"] == 1e-5
    buf = io.BytesIO()
    torch.save({"accountant": first.state_dict()}, buf)
    buf.seek(0)
    resumed = ServerPrivacy(cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=True)["accountant"])
    for r in range(8, 13):
        out = resumed.aggregate(r, _updates(len(resumed.sample_clients(r)), r), reference=REF)
        for k in REF:
            assert torch.equal(out[k], aggs[r - 1][k])  # same noise for the same round after a restart
        row = resumed.finish_round(r, sampled=[])
    assert row["epsilon"] == pytest.approx(opacus_rdp_epsilon(1.1, q, 12), rel=1e-6)
    summary = resumed.summary()
    assert summary is not None
    assert summary["epsilon"] == pytest.approx(rows[-1]["epsilon"], rel=1e-12)
    assert {k: summary[k] for k in ("delta", "noise_multiplier", "clip_norm", "accountant", "steps")} == {
        "delta": 1e-5, "noise_multiplier": 1.1, "clip_norm": 1.0, "accountant": "rdp", "steps": 12,
    }  # fmt: skip


def test_noiseless_huge_clip_run_equals_the_non_private_run() -> None:
    cfg = _cfg("client-central", total=8, per_round=8, rounds=6, clip_norm=1e9, noise_multiplier=0.0, noise_seed=0)
    exp = Experiment(cfg)
    server = ServerPrivacy(cfg)
    meta = exp.initial_meta_params()
    opt_private, opt_plain = exp.server_optimizer(meta), exp.server_optimizer(meta)
    private, plain = dict(meta), dict(meta)
    for r in range(1, 7):
        clients = server.sample_clients(r)
        assert clients == list(range(8))  # q = 1
        res_private = exp.round_updates(private, r, clients)
        updates = [{k: v[i] for k, v in res_private.updates.items()} for i in range(len(clients))]
        private = opt_private.step(server.aggregate(r, updates, reference=private))
        server.finish_round(r, sampled=clients)
        plain = opt_plain.step(exp.aggregate(exp.round_updates(plain, r, clients)))
    for k in meta:
        torch.testing.assert_close(private[k], plain[k], rtol=1e-5, atol=1e-7)
    assert math.isinf(server.epsilon()) and server.summary()["epsilon"] is None
    assert isinstance(opt_plain, ServerOptimizer)


def test_budget_stop_and_refuse_from_the_server_facade() -> None:
    stop = _cfg("client-central", noise_multiplier=2.0, target_epsilon=3.0, on_budget="stop", rounds=500)
    n = ServerPrivacy(stop).rounds_to_run()
    assert 0 < n < 500 and epsilon_for(noise_multiplier=2.0, sample_rate=0.25, steps=n, delta=1e-5) <= 3.0
    refuse = _cfg("client-central", noise_multiplier=2.0, target_epsilon=3.0, rounds=500)
    with pytest.raises(BudgetExhausted, match=f"only {n} rounds fit"):
        ServerPrivacy(refuse).rounds_to_run()


def test_checkpoint_of_another_mode_is_refused() -> None:
    state = ServerPrivacy(_cfg("client-central")).state_dict()
    with pytest.raises(CheckpointError, match="privacy.mode 'client-central', this run has 'client-local'"):
        ServerPrivacy(_cfg("client-local")).load_state_dict(state)


# -- client-local ------------------------------------------------------------------------------


def test_local_client_clips_and_adds_the_full_noise_itself() -> None:
    cfg = _cfg("client-local", clip_norm=0.5, noise_multiplier=2.0, noise_seed=3)
    big = {"w": 3.0 * torch.randn(60_000, generator=make_generator(0, "u"))}
    client = ClientPrivacy(cfg, 4)
    sent, extra = client.privatize_update(big, round_idx=1)
    residual = sent["w"] - clip_by_global_norm(big, 0.5)[0]["w"]
    assert float(residual.std()) == pytest.approx(2.0 * 0.5, rel=0.02)
    again, _ = ClientPrivacy(cfg, 4).privatize_update(big, round_idx=1)
    assert torch.equal(sent["w"], again["w"])
    assert not torch.equal(sent["w"], ClientPrivacy(cfg, 5).privatize_update(big, round_idx=1)[0]["w"])
    # a clip norm sent by the server scales the noise with it: the ratio (the guarantee) is the client's
    small, _ = ClientPrivacy(cfg, 4).privatize_update(big, round_idx=2, clip_norm=0.1)
    assert float((small["w"] - clip_by_global_norm(big, 0.1)[0]["w"]).std()) == pytest.approx(0.2, rel=0.02)
    assert extra["privacy.epsilon"] == pytest.approx(
        epsilon_for(noise_multiplier=1.0, sample_rate=1.0, steps=1, delta=1e-5), rel=1e-6
    )


def test_local_accounting_per_client_without_amplification() -> None:
    cfg = _cfg("client-local", noise_multiplier=4.0, noise_seed=0, total=30, per_round=6)
    server = ServerPrivacy(cfg)
    counts: dict[int, int] = {}
    states: dict[int, dict] = {}
    for r in range(1, 16):
        sampled = server.sample_clients(r)
        ups, reps = [], []
        for cid in sampled:
            client = ClientPrivacy(cfg, cid, state=states.get(cid))
            u, rep = client.privatize_update(_updates(1, 100 * r + cid)[0], round_idx=r)
            states[cid] = client.state_dict()
            ups.append(u)
            reps.append(rep)
            counts[cid] = counts.get(cid, 0) + 1
        server.aggregate(r, ups, reference=REF, reports=reps)
        row = server.finish_round(r, sampled=sampled)
    worst = max(counts.values())
    expected = opacus_rdp_epsilon(4.0 / 2, 1.0, worst)  # sensitivity 2C, q = 1, the client's own participations
    assert row["epsilon"] == pytest.approx(expected, rel=1e-6)
    assert server.steps == worst
    for cid, n in counts.items():  # each client's own accountant agrees with the server's mirror
        mine = ClientPrivacy(cfg, cid, state=states[cid]).epsilon()
        assert mine == pytest.approx(opacus_rdp_epsilon(2.0, 1.0, n), rel=1e-6)
    summary = server.summary()
    assert summary is not None and summary["sample_rate"] == 1.0 and summary["clients_accounted"] == len(counts)


def test_local_client_refuses_to_exceed_its_own_budget() -> None:
    cfg = _cfg("client-local", noise_multiplier=6.0, target_epsilon=3.0, noise_seed=0)
    client = ClientPrivacy(cfg, 0)
    sent = 0
    with pytest.raises(BudgetExhausted, match=r"client 0's local privacy budget is spent"):
        for r in range(1, 1000):
            client.privatize_update(REF, round_idx=r)
            sent += 1
    assert sent > 0 and client.epsilon() <= 3.0
    assert opacus_rdp_epsilon(3.0, 1.0, sent + 1) > 3.0


def test_local_adaptive_clipping_moves_the_clip_norm_from_noisy_bits() -> None:
    cfg = _cfg(
        "client-local",
        noise_multiplier=1.0,
        adaptive_clipping=True,
        clip_norm=10.0,
        noise_seed=0,
        total=100,
        per_round=50,
    )
    server = ServerPrivacy(cfg)
    for r in range(1, 31):
        sampled = server.sample_clients(r)
        instructions = server.client_config(r)
        ups, reps = [], []
        for cid in sampled:
            u, rep = ClientPrivacy(cfg, cid).privatize_update(
                _updates(1, r * 1000 + cid, scale=0.1)[0], round_idx=r, clip_norm=instructions[CLIP_NORM_KEY]
            )
            assert CLIP_BIT_KEY in rep
            ups.append(u)
            reps.append(rep)
        server.aggregate(r, ups, reference=REF, reports=reps)
        server.finish_round(r, sampled=sampled)
    # update norms are ~0.1 * sqrt(60) = 0.77: the median-tracking clip norm must have come down from 10
    assert server.clip_norm < 3.0


# -- task --------------------------------------------------------------------------------------


def test_task_mode_server_reports_the_largest_site_epsilon() -> None:
    cfg = config_from_dict({"task": {"tasks_per_site": 10}, "privacy": {"mode": "task"}})
    server = ServerPrivacy(cfg)
    out = server.aggregate(1, _updates(3, 0), reference=REF)
    torch.testing.assert_close(out["w"], torch.stack([u["w"] for u in _updates(3, 0)]).mean(0))
    row = server.finish_round(
        1,
        sampled=[1, 2],
        reports={1: {"privacy.epsilon": 0.4, "privacy.steps": 1.0}, 2: {"privacy.epsilon": 0.9, "privacy.steps": 3.0}},
    )
    assert row["epsilon"] == 0.9 and server.steps == 3
    assert server.summary()["unit"] == "task"


def test_dp_modes_send_no_unprivatized_training_metrics() -> None:
    metrics = {"query_loss_post": 0.3, "support_loss_pre": 1.2, "privacy.epsilon": 0.5, CLIP_BIT_KEY: 0.4}
    assert releasable_metrics("none", metrics) == metrics
    for mode in ("client-central", "client-local", "task"):
        assert releasable_metrics(mode, metrics) == {"privacy.epsilon": 0.5, CLIP_BIT_KEY: 0.4}


def test_without_dp_the_facades_change_nothing() -> None:
    cfg = _cfg("none")
    server = ServerPrivacy(cfg)
    assert server.finish_round(1, sampled=[0]) == {} and server.summary() is None and server.client_config(1) == {}
    u = _updates(1, 0)[0]
    sent, extra = ClientPrivacy(cfg, 0).privatize_update(u, round_idx=1)
    assert sent is u and extra == {}
    assert global_l2_norm(sent) > 0


def test_prv_epsilon_is_computed_on_eval_rounds_and_the_last() -> None:
    cfg = _cfg("client-central", accountant="prv", rounds=7, noise_seed=0)  # eval.every = 5
    server = ServerPrivacy(cfg)
    rows = [server.finish_round(r, sampled=[]) for r in range(1, 8)]
    assert [r for r, row in enumerate(rows, start=1) if "epsilon" in row] == [5, 7]
    assert rows[-1]["epsilon"] == pytest.approx(
        epsilon_for(noise_multiplier=1.0, sample_rate=0.25, steps=7, delta=1e-5, mechanism="prv"), rel=1e-6
    )


def test_local_server_state_survives_a_safe_checkpoint_load() -> None:
    cfg = _cfg("client-local", noise_multiplier=3.0, noise_seed=0)
    server = ServerPrivacy(cfg)
    for r in range(1, 6):
        server.finish_round(r, sampled=server.sample_clients(r))
    buf = io.BytesIO()
    torch.save({"accountant": server.state_dict()}, buf)
    buf.seek(0)
    resumed = ServerPrivacy(cfg)
    resumed.load_state_dict(torch.load(buf, weights_only=True)["accountant"])
    assert resumed.epsilon() == server.epsilon() > 0
    assert resumed.steps == server.steps and resumed.rounds_completed == 5
