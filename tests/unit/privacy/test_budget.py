"""Budgets and bad privacy configs: clear errors, rounds that fit, sigma calibration (all against Opacus)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from fedmeta.config import config_from_dict, load_config
from fedmeta.errors import BudgetExhausted, ConfigError
from fedmeta.privacy.accountant import epsilon_for
from fedmeta.privacy.budget import (
    BudgetTarget,
    calibrate_config_noise_multiplier,
    calibrate_noise_multiplier,
    enforce_budget,
    plan_privacy,
    rounds_that_fit,
)

CENTRAL = {"federation": {"clients_total": 1000, "clients_per_round": 50, "rounds": 400, "sampling": "poisson"}}


def _cfg(privacy: dict, **sections: dict):
    data = {**CENTRAL, **sections}
    data["privacy"] = privacy
    return config_from_dict(data)


@pytest.mark.parametrize(
    ("yaml_text", "match"),
    [
        (
            "privacy:\n  noise_multiplier: -0.5\n",
            r"config key 'privacy.noise_multiplier' must be a non-negative number, got -0.5",
        ),
        ("privacy:\n  clip_norm: 0\n", r"config key 'privacy.clip_norm' must be a positive number, got 0"),
        ("privacy:\n  delta: 1\n", r"config key 'privacy.delta' must lie strictly between 0 and 1, got 1"),
        ("privacy:\n  delta: 2.5\n", r"'privacy.delta'.*2.5"),
        ("privacy:\n  delta: 0\n", r"'privacy.delta'.*0"),
        ("privacy:\n  target_epsilon: -1\n", r"'privacy.target_epsilon'.*-1"),
        ("privacy:\n  accountant: moments\n", r"'privacy.accountant' must be one of rdp, prv, gdp, got 'moments'"),
        ("privacy:\n  on_budget: ignore\n", r"'privacy.on_budget'.*ignore"),
        ("privacy:\n  target_quantile: 1.0\n", r"'privacy.target_quantile'.*1.0"),
        ("privacy:\n  clip_lr: 0\n", r"'privacy.clip_lr'.*0"),
        ("privacy:\n  noise_seed: -3\n", r"'privacy.noise_seed'.*-3"),
        (
            # an explicit other sampling is refused (the default becomes Poisson: test_mechanisms.py)
            "privacy:\n  mode: client-central\nfederation:\n  sampling: uniform\n",
            r"'federation.sampling' must be 'poisson' for privacy.mode 'client-central'.*'uniform'",
        ),
        (
            "privacy:\n  mode: client-central\nfederation:\n  sampling: poisson\n  aggregation: median\n",
            r"'federation.aggregation' must be 'mean' for privacy.mode 'client-central'.*'median'",
        ),
        ("privacy:\n  mode: task\n", r"'task.tasks_per_site' must be set for privacy.mode 'task'"),
        (
            "privacy:\n  mode: task\n  adaptive_clipping: true\ntask:\n  tasks_per_site: 20\n",
            r"'privacy.adaptive_clipping' applies to.*'task'",
        ),
        (
            "privacy:\n  mode: client-central\n  adaptive_clipping: true\n  noise_multiplier: 3\nfederation:\n  "
            "sampling: poisson\n",
            r"'privacy.clipped_count_stddev' must exceed privacy.noise_multiplier / 2 = 1.5.*got 1.25",
        ),
    ],
)
def test_bad_privacy_config_gets_a_clear_error(tmp_path: Path, yaml_text: str, match: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


def test_rounds_that_fit_is_the_exact_boundary() -> None:
    target, delta, sigma, q = 3.0, 1e-5, 1.0, 0.05
    n = rounds_that_fit(BudgetTarget(target, delta, q), noise_multiplier=sigma, max_rounds=5000)
    assert 0 < n < 5000
    assert epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=n, delta=delta) <= target
    assert epsilon_for(noise_multiplier=sigma, sample_rate=q, steps=n + 1, delta=delta) > target
    assert rounds_that_fit(BudgetTarget(1e6, delta, q), noise_multiplier=sigma, max_rounds=50) == 50


def test_plan_of_each_mode_equals_opacus_for_its_own_parameters() -> None:
    central = plan_privacy(_cfg({"mode": "client-central", "noise_multiplier": 1.1}))
    assert (central.accounted_noise_multiplier, central.sample_rate, central.steps) == (1.1, 0.05, 400)
    assert central.epsilon == pytest.approx(
        epsilon_for(noise_multiplier=1.1, sample_rate=0.05, steps=400, delta=1e-5), rel=1e-6
    )

    local = plan_privacy(_cfg({"mode": "client-local", "noise_multiplier": 20.0}))
    # local DP: sensitivity 2C (z/2), no amplification (q = 1), a client in every round
    assert (local.accounted_noise_multiplier, local.sample_rate, local.steps) == (10.0, 1.0, 400)
    assert local.epsilon == pytest.approx(
        epsilon_for(noise_multiplier=10.0, sample_rate=1.0, steps=400, delta=1e-5), rel=1e-6
    )

    task = plan_privacy(
        _cfg({"mode": "task", "noise_multiplier": 1.0}, task={"tasks_per_site": 40}, meta={"tasks_per_client": 4})
    )
    assert (task.accounted_noise_multiplier, task.sample_rate, task.unit) == (1.0, 0.1, "task")
    assert task.epsilon == pytest.approx(
        epsilon_for(noise_multiplier=1.0, sample_rate=0.1, steps=400, delta=1e-5), rel=1e-6
    )

    none = plan_privacy(_cfg({"mode": "none"}))
    assert none.epsilon is None and none.within_budget


def test_schedule_over_budget_refuses_to_start_and_says_how_many_rounds_fit() -> None:
    cfg = _cfg({"mode": "client-central", "noise_multiplier": 1.2, "target_epsilon": 2.0})
    plan = plan_privacy(cfg)
    assert not plan.within_budget and plan.epsilon > 2.0
    fit = plan.rounds_that_fit
    assert fit == rounds_that_fit(BudgetTarget(2.0, 1e-5, 0.05), noise_multiplier=1.2, max_rounds=400)
    with pytest.raises(BudgetExhausted) as err:
        enforce_budget(cfg)
    msg = str(err.value)
    assert f"only {fit} rounds fit" in msg
    assert f"set federation.rounds to at most {fit}" in msg
    assert "privacy.on_budget: stop" in msg
    assert "raise privacy.noise_multiplier to" in msg


def test_on_budget_stop_plans_the_last_round_that_fits() -> None:
    cfg = _cfg({"mode": "client-central", "noise_multiplier": 1.2, "target_epsilon": 2.0, "on_budget": "stop"})
    fit = plan_privacy(cfg).rounds_that_fit
    assert enforce_budget(cfg) == fit
    assert epsilon_for(noise_multiplier=1.2, sample_rate=0.05, steps=fit, delta=1e-5) <= 2.0
    # not even one round fits: refuse even with "stop"
    tiny = _cfg({"mode": "client-central", "noise_multiplier": 0.3, "target_epsilon": 0.01, "on_budget": "stop"})
    with pytest.raises(BudgetExhausted, match="only 0 rounds fit"):
        enforce_budget(tiny)


def test_within_budget_runs_every_round() -> None:
    cfg = _cfg({"mode": "client-central", "noise_multiplier": 1.5, "target_epsilon": 50.0})
    assert enforce_budget(cfg) == 400
    assert enforce_budget(_cfg({"mode": "none", "target_epsilon": 1.0})) == 400


def test_calibrated_sigma_spends_just_under_the_target() -> None:
    sigma = calibrate_noise_multiplier(BudgetTarget(4.0, 1e-5, 0.05), steps=400)
    eps = epsilon_for(noise_multiplier=sigma, sample_rate=0.05, steps=400, delta=1e-5)
    assert 4.0 - 0.01 <= eps <= 4.0


def test_config_calibration_per_mode() -> None:
    central = _cfg({"mode": "client-central", "target_epsilon": 4.0})
    assert calibrate_config_noise_multiplier(central) == pytest.approx(
        calibrate_noise_multiplier(BudgetTarget(4.0, 1e-5, 0.05), steps=400)
    )
    local = _cfg({"mode": "client-local"})
    z = calibrate_config_noise_multiplier(local, target_epsilon=100.0)
    eps = epsilon_for(noise_multiplier=z / 2, sample_rate=1.0, steps=400, delta=1e-5)
    assert 100.0 - 0.01 <= eps <= 100.0
    with pytest.raises(ValueError, match="no target epsilon"):
        calibrate_config_noise_multiplier(central.__class__(**{**central.__dict__, "privacy": local.privacy}))


def test_noiseless_schedule_is_unbounded_and_fits_no_round() -> None:
    cfg = _cfg({"mode": "client-central", "noise_multiplier": 0.0, "target_epsilon": 10.0})
    plan = plan_privacy(cfg)
    assert math.isinf(plan.epsilon) and plan.rounds_that_fit == 0
    assert plan.to_dict()["epsilon"] is None and plan.to_dict()["epsilon_unbounded"] is True
    with pytest.raises(BudgetExhausted):
        enforce_budget(cfg)
