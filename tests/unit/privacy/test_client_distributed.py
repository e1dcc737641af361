"""``privacy.mode: client-distributed`` (issue 19): fixed point, refusals, the secure sum, accounting, dropouts."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.config import config_from_dict
from fedmeta.errors import ConfigError, InconsistentReplies
from fedmeta.federation.loop import RoundLoop
from fedmeta.federation.transport import InProcessTransport
from fedmeta.outputs import read_metrics
from fedmeta.privacy.mechanisms import mechanism_for
from fedmeta.privacy.mechanisms.client_distributed import default_min_survivors, survivor_noise_multiplier
from fedmeta.privacy.secure_sum import (
    CLIP_PROBABILITY,
    SecureSum,
    check_sum,
    choose_fixed_point,
    encode_update,
    max_cohort,
    quantize,
    sum_quantized,
)
from tests.privacy_helpers import dp_config, opacus_rdp_epsilon

# -- the fixed point --------------------------------------------------------------------------


def test_range_bounds_the_probability_of_clipping_any_coordinate_of_any_update() -> None:
    fp = choose_fixed_point(clip_norm=1.0, share_std=0.5, dimension=1000, cohort=10)
    # union bound over m d coordinates of P(|N(0, s^2)| > R - C) <= 2 exp(-(R - C)^2 / 2 s^2)
    assert 10 * 1000 * 2 * math.exp(-((fp.clipping_range - 1.0) ** 2) / (2 * 0.25)) <= CLIP_PROBABILITY * (1 + 1e-9)
    assert fp.clip_probability <= CLIP_PROBABILITY * (1 + 1e-9)
    # the exact Gaussian tail at R is smaller still
    exact = 10 * 1000 * math.erfc((fp.clipping_range - 1.0) / (0.5 * math.sqrt(2)))
    assert exact < CLIP_PROBABILITY
    # Q as large as m Q < M allows (capped for Flower's int32 rounding)
    assert 10 * fp.quantization_range < fp.modulus and 11 * fp.quantization_range >= fp.modulus - 1
    small = choose_fixed_point(clip_norm=1.0, share_std=0.5, dimension=1000, cohort=2)
    assert small.quantization_range == 2**30
    assert choose_fixed_point(clip_norm=2.0, share_std=0.0, dimension=5, cohort=3).clipping_range == 2.0


def test_cohorts_beyond_the_modulus_bound_are_refused_naming_the_key() -> None:
    assert max_cohort() == (2**32 - 1) // 2**16
    with pytest.raises(ConfigError, match=r"config key 'federation.clients_per_round' must be at most 65535"):
        choose_fixed_point(clip_norm=1.0, share_std=0.1, dimension=10, cohort=max_cohort() + 1)
    with pytest.raises(ConfigError, match=r"'federation.clients_per_round' must lie in \[2, 65535\]"):
        dp_config("client-distributed", total=70000, per_round=66000)


def test_quantized_sum_equals_the_plain_sum_within_the_stated_error() -> None:
    fp = choose_fixed_point(clip_norm=1.0, share_std=0.3, dimension=30, cohort=5)
    gen = torch.Generator().manual_seed(0)
    updates = [{"w": torch.randn(5, 4, generator=gen, dtype=torch.float64) * 0.2,
                "b": torch.randn(10, generator=gen, dtype=torch.float64) * 0.2} for _ in range(5)]  # fmt: skip
    rng = np.random.default_rng(1)
    quantized = [quantize(encode_update(u, fp)[0], fp, rng) for u in updates]
    total = SecureSum(sum_quantized(quantized, fp), (0, 1, 2, 3, 4), fp)
    reference = {"w": torch.zeros(5, 4, dtype=torch.float64), "b": torch.zeros(10, dtype=torch.float64)}
    summed, info = check_sum(total, reference, min_survivors=3)
    assert summed is not None and info["survivors"] == 5 and info["clipped_coordinates"] == 0
    for k in reference:
        plain = sum(u[k] for u in updates)
        assert float((summed[k] - plain).abs().max()) <= fp.error_bound(5)
    assert info["quantization_error_bound"] == fp.error_bound(5) == 5 * 2 * fp.clipping_range / fp.quantization_range


def test_clipped_coordinates_travel_in_the_sum_and_garbage_fails_the_checks() -> None:
    fp = choose_fixed_point(clip_norm=1.0, share_std=0.01, dimension=4, cohort=3)
    ref = {"x": torch.zeros(4, dtype=torch.float64)}
    big = {"x": torch.tensor([5.0, -5.0, 0.1, 0.0], dtype=torch.float64)}  # two coordinates beyond R
    arrays, clipped = encode_update(big, fp)
    assert clipped == 2 and float(np.abs(arrays[0]).max()) == pytest.approx(fp.clipping_range)
    rng = np.random.default_rng(0)
    ok = {"x": torch.tensor([0.1, 0.0, 0.0, 0.0], dtype=torch.float64)}
    q = [quantize(encode_update(u, fp)[0], fp, rng) for u in (big, ok, ok)]
    _, info = check_sum(SecureSum(sum_quantized(q, fp), (0, 1, 2), fp), ref, min_survivors=2)
    assert info["clipped_coordinates"] == 2
    # a client that sends an arbitrary integer vector instead of its quantized update
    garbage = [np.array([2**31, 7, 2**30, 5], dtype=np.int64), np.array([0, 0], dtype=np.int64)]
    summed, info = check_sum(SecureSum(sum_quantized([*q[1:], garbage], fp), (0, 1, 2), fp), ref, min_survivors=2)
    assert summed is None and "sum_check" in info
    # an extra update smuggled into the sum: the presence marker counts 3, not the 2 survivors
    summed, info = check_sum(SecureSum(sum_quantized(q, fp), (0, 1), fp), ref, min_survivors=2)
    assert summed is None and "presence marker" in str(info["sum_check"])


# -- config and refusals ----------------------------------------------------------------------


def test_threshold_default_and_validation() -> None:
    assert [default_min_survivors(m) for m in (2, 3, 4, 10)] == [2, 2, 3, 7]
    cfg = dp_config("client-distributed", total=10, per_round=6)
    assert mechanism_for(cfg).min_survivors(cfg) == 4
    for bad in (1, 7):
        match = r"'privacy.min_survivors' must be an integer in \[2, federation.clients_per_round=6\]"
        with pytest.raises(ConfigError, match=match):
            dp_config("client-distributed", total=10, per_round=6, min_survivors=bad)
    with pytest.raises(ConfigError, match=r"config key 'privacy.min_survivors' must be int or null, got 2.5"):
        dp_config("client-distributed", total=10, per_round=6, min_survivors=2.5)


@pytest.mark.parametrize(
    ("section", "key", "value", "match"),
    [
        ("meta", "trlearner", {"federated": "weights"}, r"'meta.trlearner.federated' must be 'off' for privacy.mode "
                                                        r"'client-distributed': the server receives only the sum"),
        ("federation", "aggregation", "median", r"'federation.aggregation' must be 'mean' for privacy.mode "
                                                 r"'client-distributed'"),
        ("federation", "sampling", "poisson", r"'federation.sampling' must be 'uniform' for privacy.mode "
                                              r"'client-distributed'"),
        ("privacy", "adaptive_clipping", True, r"'privacy.adaptive_clipping' applies to privacy.mode client-central"),
        ("eval", "clients", 2, r"'eval.clients' must be 0 under privacy.mode 'client-distributed'"),
    ],
)
def test_what_needs_individual_updates_is_refused_naming_the_key(
    section: str, key: str, value: object, match: str
) -> None:
    base = {
        "task": {"name": "sinusoid", "tasks_per_site": 10},
        "federation": {"clients_total": 6, "clients_per_round": 6},
        "privacy": {"mode": "client-distributed"},
    }
    base.setdefault(section, {})[key] = value  # type: ignore[index]
    with pytest.raises(ConfigError, match=match):
        config_from_dict(base)


def test_reply_transforms_are_refused(tmp_path: Path) -> None:
    cfg = dp_config("client-distributed", rounds=1, total=4, per_round=4)
    with pytest.raises(ConfigError, match=r"hands the server only the sum of the updates: reply transforms"):
        RoundLoop(cfg, tmp_path, update_transforms=[lambda r, replies: replies])


def test_a_client_sends_no_metric_and_weight_one() -> None:
    from fedmeta.experiment import Experiment
    from fedmeta.privacy.client_update import private_client_update
    from fedmeta.privacy.facade import ClientPrivacy

    cfg = dp_config("client-distributed", total=4, per_round=4, min_survivors=2)
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    update, extra = private_client_update(exp, meta, 1, 0, ClientPrivacy(cfg, 0))
    assert update.num_tasks == 1 and update.metrics == {} and extra == {}
    raw = exp.client_update(meta, 1, 0).gradient
    # clipped to C = 0.5 and noised with std sigma C / sqrt(t) = 1.2 * 0.5 / sqrt(2)
    noise = torch.cat([(update.gradient[k] - raw[k] * min(1.0, 0.5 / float(
        torch.sqrt(sum((v.double() ** 2).sum() for v in raw.values()))))).reshape(-1) for k in raw])  # fmt: skip
    assert float(noise.std()) == pytest.approx(1.2 * 0.5 / math.sqrt(2), rel=0.1)


# -- the in-process reference: accounting and dropouts ----------------------------------------


def test_epsilon_is_opacus_at_the_survivors_noise(tmp_path: Path) -> None:
    cfg = dp_config("client-distributed", rounds=3, total=4, per_round=4, min_survivors=3)
    drops = {(2, 1)}  # client 1 drops out in round 2: 3 of 4 survive, n = t
    loop = RoundLoop(cfg, tmp_path, mode="centralized")
    loop.run(InProcessTransport(drop_out=lambda r, c: (r, c) in drops))
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "privacy" in r]
    assert [r["privacy"]["survivors"] for r in rows] == [4, 3, 4]
    assert [r["replies"] for r in rows] == [4, 3, 4] and [r["failed"] for r in rows] == [0, 1, 0]
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for r, n in zip((1, 2, 3), (4, 3, 4)):
        z = survivor_noise_multiplier(1.2, survivors=n, threshold=3)
        assert rows[r - 1]["privacy"]["accounted_noise_multiplier"] == pytest.approx(z)
        acc.step(noise_multiplier=z, sample_rate=1.0)
        assert rows[r - 1]["privacy"]["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6)
    assert rows[1]["privacy"]["accounted_noise_multiplier"] == pytest.approx(1.2)
    assert opacus_rdp_epsilon(1.2, 1.0, 1) < rows[0]["privacy"]["epsilon"] * 2  # sanity: q = 1, no amplification


def test_a_round_below_the_threshold_releases_nothing_and_stops(tmp_path: Path) -> None:
    cfg = dp_config("client-distributed", rounds=3, total=4, per_round=4, min_survivors=3)
    loop = RoundLoop(cfg, tmp_path, mode="centralized")
    transport = InProcessTransport(drop_out=lambda r, c: r == 2 and c in (0, 3))  # 2 of 4 survive round 2
    with pytest.raises(InconsistentReplies, match=r"round 2: the secure aggregation halted and unmasked nothing "
                                                  r"\(privacy.min_survivors=3"):
        loop.run(transport)
    assert loop.round == 1
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "privacy" in r]
    assert [r["round"] for r in rows] == [1]
    policy = loop.policy
    assert policy.accountant.steps == 1  # type: ignore[attr-defined]
    from fedmeta.checkpoint import load_checkpoint

    assert load_checkpoint(tmp_path / "checkpoint.pt")["round"] == 1


def test_constraint_generators_mix_into_the_noisy_sum_and_epsilon_does_not_move(tmp_path: Path) -> None:
    """The generators' stage sees only the aggregate (the noisy mean of the secure sum), as under any mode."""
    from fedmeta.centralized import run_centralized

    def cfg(generators: dict[str, object] | None) -> object:
        data: dict[str, object] = {
            "task": {"name": "sinusoid", "amplitude": [0.1, 1.05]},
            "meta": {"tasks_per_client": 2},
            "federation": {"clients_total": 3, "clients_per_round": 3, "rounds": 2},
            "privacy": {"mode": "client-distributed", "noise_seed": 5, "min_survivors": 2},
            "eval": {"tasks": 10, "every": 2, "steps": 2},
        }
        if generators:
            data["generators"] = generators
        return config_from_dict(data)

    direct = {"mode": "direct", "depth": 2, "weight": 0.4, "tasks": 6, "family": {"amplitude": [0.1, 5.0]}}
    plain = run_centralized(cfg(None), tmp_path / "plain")  # type: ignore[arg-type]
    mixed = run_centralized(cfg(direct), tmp_path / "mixed")  # type: ignore[arg-type]
    assert plain["privacy"] == mixed["privacy"] and mixed["rounds_completed"] == 2
    rows = [r for r in read_metrics(tmp_path / "mixed" / "metrics.jsonl") if "generators" in r]
    assert [r["round"] for r in rows] == [1, 2]


class _GarbageInRound:
    """The in-process transport, with one client's contribution replaced by garbage in one round."""

    def __init__(self, round_idx: int) -> None:
        self.inner = InProcessTransport()
        self.round_idx = round_idx

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)

    def train(self, loop: RoundLoop, book: object) -> None:
        import dataclasses

        self.inner.train(loop, book)  # type: ignore[arg-type]
        total = book.secure_sum  # type: ignore[attr-defined]
        if book.round_idx == self.round_idx and total is not None:  # type: ignore[attr-defined]
            # an arbitrary integer vector modulo M instead of a quantized update: after unmasking
            # the sum's coordinates are far outside what n clipped noisy updates can add up to
            arrays = [a + 1e3 * total.fixed_point.clipping_range for a in total.arrays[:-1]]
            book.secure_sum = dataclasses.replace(total, arrays=(*arrays, total.arrays[-1]))  # type: ignore[attr-defined]


def test_a_garbage_sum_spoils_its_round_not_the_run(tmp_path: Path) -> None:
    cfg = dp_config("client-distributed", rounds=3, total=4, per_round=4, min_survivors=3)
    loop = RoundLoop(cfg, tmp_path, mode="centralized")
    summary = loop.run(_GarbageInRound(2))  # type: ignore[arg-type]
    assert summary["rounds_completed"] == 3
    rows = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "privacy" in r]
    assert "sum_check" not in rows[0]["privacy"] and "sum_check" not in rows[2]["privacy"]
    assert "exceeds" in rows[1]["privacy"]["sum_check"] and rows[1]["update_norm"] is None
    assert rows[0]["update_norm"] is not None and rows[2]["update_norm"] is not None
    # the server saw the garbage round's sum: it is accounted like the others
    assert [r["privacy"]["steps"] for r in rows] == [1, 2, 3]
