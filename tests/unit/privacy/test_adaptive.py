"""Quantile-based adaptive clipping (Andrew et al., 2021): noise split, convergence, and its accounted cost."""

from __future__ import annotations

import math

import pytest
import torch

from fedmeta.config import config_from_dict
from fedmeta.privacy.accountant import epsilon_for
from fedmeta.privacy.adaptive import (
    AdaptiveClipState,
    clipped_indicator,
    effective_noise_multiplier,
    fraction_from_local_indicators,
    local_noisy_indicator,
    next_clip_norm,
    noisy_unclipped_fraction,
    update_noise_multiplier,
)
from fedmeta.privacy.facade import ServerPrivacy
from fedmeta.rng import make_generator


def test_noise_split_matches_the_paper_and_inverts() -> None:
    # Andrew et al. Sec. 3.2 with z = 1 and sigma_b = 25 / 20: z_u = (1 - (2.5)^-2)^-1/2
    z_u = update_noise_multiplier(1.0, 1.25)
    assert z_u == pytest.approx((1 - 2.5**-2) ** -0.5)
    assert z_u > 1.0  # the update pays for the count with more noise
    for z, sb in [(0.5, 0.3), (1.0, 1.25), (2.0, 5.0), (4.0, 2.1)]:
        assert effective_noise_multiplier(update_noise_multiplier(z, sb), sb) == pytest.approx(z, rel=1e-12)
    assert update_noise_multiplier(0.0, 1.0) == 0.0
    assert effective_noise_multiplier(1.0, 0.0) == 0.0  # a noiseless count leaks: no privacy


def test_noise_split_refuses_a_count_that_costs_the_whole_budget() -> None:
    with pytest.raises(
        ValueError,
        match=r"clipped_count_stddev > noise_multiplier / 2.*clipped_count_stddev=0.5 and noise_multiplier=1",
    ):
        update_noise_multiplier(1.0, 0.5)


def test_clip_norm_converges_to_the_target_quantile_without_noise() -> None:
    gen = make_generator(0, "norms")
    norms = torch.exp(torch.randn(400, generator=gen) * 0.8).tolist()  # log-normal norms, median 1
    for gamma in (0.2, 0.5, 0.9):
        state = AdaptiveClipState(clip_norm=0.05, target_quantile=gamma, lr=0.2, count_stddev=0.0)
        for r in range(400):
            bits = [clipped_indicator(n, state.clip_norm) for n in norms]
            frac = noisy_unclipped_fraction(
                bits, count_stddev=0.0, expected_count=len(norms), generator=make_generator(0, r)
            )
            state = state.updated(frac)
        quantile = float(torch.tensor(norms).quantile(gamma))
        assert state.clip_norm == pytest.approx(quantile, rel=0.05)


def test_clip_norm_tracks_the_quantile_under_count_noise() -> None:
    gen = make_generator(1, "norms")
    cohort = 100
    state = AdaptiveClipState(clip_norm=10.0, target_quantile=0.5, lr=0.2, count_stddev=cohort / 20)
    late = []
    for r in range(600):
        norms = torch.exp(torch.randn(cohort, generator=gen) * 0.5).tolist()
        bits = [clipped_indicator(n, state.clip_norm) for n in norms]
        frac = noisy_unclipped_fraction(
            bits, count_stddev=state.count_stddev, expected_count=cohort, generator=make_generator(1, "count", r)
        )
        state = state.updated(frac)
        if r >= 300:
            late.append(math.log(state.clip_norm))
    assert math.exp(sum(late) / len(late)) == pytest.approx(1.0, abs=0.1)  # the median of the norms


def test_released_fraction_noise_has_the_calibrated_std() -> None:
    bits = [1.0] * 30 + [0.0] * 10
    draws = torch.tensor(
        [
            noisy_unclipped_fraction(bits, count_stddev=2.0, expected_count=40, generator=make_generator(2, i))
            for i in range(4000)
        ]
    )
    assert float(draws.mean()) == pytest.approx(0.75, abs=0.01)
    assert float(draws.std()) == pytest.approx(2.0 / 40, rel=0.05)


def test_local_bits_average_to_the_fraction() -> None:
    values = [
        local_noisy_indicator(0.5 if i % 4 else 2.0, 1.0, count_stddev=1.0, generator=make_generator(3, i))
        for i in range(8000)
    ]
    assert fraction_from_local_indicators(values) == pytest.approx(0.75, abs=0.04)
    assert float(torch.tensor(values).std()) == pytest.approx(math.sqrt(1.0 + 0.75 * 0.25), rel=0.05)
    assert fraction_from_local_indicators([]) is None


def test_geometric_update_direction() -> None:
    assert next_clip_norm(1.0, 0.9, target_quantile=0.5, lr=0.2) < 1.0  # too few clipped: shrink
    assert next_clip_norm(1.0, 0.1, target_quantile=0.5, lr=0.2) > 1.0
    assert next_clip_norm(1.0, 0.5, target_quantile=0.5, lr=0.2) == 1.0


def test_adaptive_clipping_cost_is_accounted() -> None:
    cfg = config_from_dict(
        {
            "federation": {"clients_total": 200, "clients_per_round": 40, "rounds": 30, "sampling": "poisson"},
            "privacy": {"mode": "client-central", "noise_multiplier": 1.0, "adaptive_clipping": True, "noise_seed": 0},
        }
    )
    server = ServerPrivacy(cfg)
    sigma_b = 40 / 20
    assert server.count_stddev == sigma_b
    assert server.update_noise_multiplier == pytest.approx(update_noise_multiplier(1.0, sigma_b))
    ref = {"w": torch.zeros(5)}
    for r in range(1, 31):
        updates = [{"w": torch.full((5,), 0.1 * (i + 1))} for i in range(len(server.sample_clients(r)))]
        server.aggregate(r, updates, reference=ref)
        server.finish_round(r, sampled=[])
    # the accountant is charged the effective z of update + count (= the configured 1.0) ...
    assert server.accountant is not None
    assert server.accountant.history == [(pytest.approx(1.0), 0.2, 30)]
    expected = epsilon_for(noise_multiplier=1.0, sample_rate=0.2, steps=30, delta=1e-5)
    assert server.epsilon() == pytest.approx(expected, rel=1e-6)
    # ... which costs more than the update noise alone would
    assert server.epsilon() > epsilon_for(
        noise_multiplier=server.update_noise_multiplier, sample_rate=0.2, steps=30, delta=1e-5
    )
    assert server.summary()["final_clip_norm"] != 1.0  # the clip norm moved


def test_one_client_cannot_drive_the_clip_norm_to_zero_or_infinity() -> None:
    # issue 15, finding 7: under client-local DP the clip bits are the clients' claims; one huge
    # bit took C to 0 (or infinity) in a round, and every honest client's next round failed on it
    from fedmeta.config import config_from_dict
    from fedmeta.privacy.facade import CLIP_NORM_KEY, ServerPrivacy
    from fedmeta.privacy.mechanisms.base import CLIP_BIT_KEY

    cfg = config_from_dict(
        {"federation": {"clients_total": 10, "clients_per_round": 5},
         "privacy": {"mode": "client-local", "adaptive_clipping": True, "noise_seed": 1}}
    )  # fmt: skip
    server = ServerPrivacy(cfg)
    update = {"w": torch.zeros(3)}
    honest = [{CLIP_BIT_KEY: 0.5}] * 4
    norms = []
    for r, claim in enumerate([1e9] * 30 + [-1e300] * 40, start=1):
        server.aggregate(r, [update] * 5, reference=update, reports=[*honest, {CLIP_BIT_KEY: claim}])
        norms.append(server.client_config(r + 1)[CLIP_NORM_KEY])
    ratios = [b / a for a, b in zip([1.0, *norms], norms)]
    assert all(0.5 - 1e-12 <= x <= 2.0 + 1e-12 for x in ratios)  # privacy.clip_max_step: at most x2 a round
    assert min(norms) == pytest.approx(1e-3) and max(norms) == pytest.approx(1e3)  # clip_norm / 1000, x 1000
    assert all(math.isfinite(n) and n > 0 for n in norms)


def test_clip_norm_bounds_are_validated_naming_the_key() -> None:
    from fedmeta.config import config_from_dict
    from fedmeta.errors import ConfigError

    assert config_from_dict({"privacy": {"clip_norm": 2.0}}).privacy.clip_norm_bounds == (0.002, 2000.0)
    for privacy, key in (
        ({"clip_norm_min": 0.0}, "privacy.clip_norm_min"),
        ({"clip_norm_min": 5.0}, "privacy.clip_norm_min"),
        ({"clip_norm_max": 0.5}, "privacy.clip_norm_max"),
        ({"clip_max_step": 1.0}, "privacy.clip_max_step"),
    ):
        with pytest.raises(ConfigError, match=f"config key '{key}'"):
            config_from_dict({"privacy": privacy})
