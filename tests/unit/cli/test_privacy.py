"""``fedmeta privacy CONFIG``: the epsilon it prints equals an independent Opacus computation."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest

from fedmeta.cli import main
from tests.privacy_helpers import opacus_rdp_epsilon

CONFIG = """\
seed: 0
federation:
  clients_total: 1000
  clients_per_round: 20
  rounds: 300
  sampling: poisson
privacy:
  mode: client-central
  noise_multiplier: 1.1
  clip_norm: 0.5
  delta: 1.0e-6
"""


@pytest.fixture()
def config(tmp_path: Path) -> Path:
    path = tmp_path / "dp.yaml"
    path.write_text(CONFIG)
    return path


def _run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict:
    assert main(["privacy", *argv, "--json"]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1  # exactly one JSON object
    return json.loads(out)


def test_json_epsilon_matches_opacus(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _run_json(capsys, str(config))
    assert report["epsilon"] == pytest.approx(opacus_rdp_epsilon(1.1, 20 / 1000, 300, 1e-6), rel=1e-6)
    assert report["delta"] == 1e-6
    assert (report["noise_multiplier"], report["clip_norm"], report["sample_rate"], report["steps"]) == (
        1.1,
        0.5,
        0.02,
        300,
    )
    assert report["accountant"] == "rdp" and report["mode"] == "client-central"


def test_overrides_and_local_mode(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _run_json(
        capsys, str(config), "--set", "privacy.mode=client-local", "privacy.noise_multiplier=30", "federation.rounds=50"
    )
    # local DP: z / 2 (sensitivity 2C), no amplification (q = 1)
    assert report["epsilon"] == pytest.approx(opacus_rdp_epsilon(15.0, 1.0, 50, 1e-6), rel=1e-6)
    assert report["sample_rate"] == 1.0 and report["accounted_noise_multiplier"] == 15.0


def test_budget_rounds_that_fit_and_calibration(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from opacus.accountants.utils import get_noise_multiplier

    report = _run_json(capsys, str(config), "--set", "privacy.target_epsilon=1.5", "--calibrate")
    fit = report["rounds_that_fit"]
    assert 0 < fit < 300
    assert not report["within_budget"] and report["refuses_to_start"] and report["rounds_to_run"] == 0
    assert opacus_rdp_epsilon(1.1, 0.02, fit, 1e-6) <= 1.5 < opacus_rdp_epsilon(1.1, 0.02, fit + 1, 1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = get_noise_multiplier(
            target_epsilon=1.5, target_delta=1e-6, sample_rate=0.02, steps=300, accountant="rdp"
        )
    assert report["calibration"]["noise_multiplier"] == pytest.approx(expected, rel=1e-9)
    stop = _run_json(capsys, str(config), "--set", "privacy.target_epsilon=1.5", "privacy.on_budget=stop")
    assert stop["rounds_to_run"] == fit and not stop["refuses_to_start"]


def test_human_output_names_epsilon_and_trust_model(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", str(config), "--set", "privacy.target_epsilon=1.0"]) == 0
    out = capsys.readouterr().out
    assert "epsilon = " in out and "delta = 1e-06" in out
    assert "noise added by:  the server (trusted)" in out
    assert "EXCEEDS target epsilon 1" in out and "rounds fit" in out


def test_no_dp_prints_null_epsilon(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _run_json(capsys, str(config), "--set", "privacy.mode=none")
    assert report["epsilon"] is None and report["mode"] == "none"


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("privacy.noise_multiplier=-1", "'privacy.noise_multiplier' must be a non-negative number, got -1"),
        ("privacy.clip_norm=0", "'privacy.clip_norm' must be a positive number, got 0"),
        ("privacy.delta=1", "'privacy.delta' must lie strictly between 0 and 1, got 1"),
        ("federation.sampling=uniform", "'federation.sampling' must be 'poisson'"),
    ],
)
def test_bad_config_exits_with_a_clear_message(
    config: Path, capsys: pytest.CaptureFixture[str], override: str, match: str
) -> None:
    assert main(["privacy", str(config), "--set", override]) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_calibrate_without_target_is_an_error(config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["privacy", str(config), "--calibrate"]) == 2
    assert "--calibrate needs a target" in capsys.readouterr().err
