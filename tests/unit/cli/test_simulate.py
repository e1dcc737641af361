"""``fedmeta simulate`` refuses what it cannot do before starting Flower."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmeta.cli import main


def test_simulate_refuses_a_privacy_budget_it_would_exceed_before_starting_flower(
    repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["simulate", str(repo_root / "configs" / "sinusoid.yaml"), "--out", str(tmp_path), "--quiet", "--set"]
    privacy = [
        "privacy.mode=client-central",
        "federation.sampling=poisson",
        "privacy.noise_multiplier=0.5",
        "privacy.target_epsilon=1",
    ]
    rc = main([*args, *privacy])
    assert rc == 5  # BudgetExhausted
    err = capsys.readouterr().err
    assert "privacy.target_epsilon=1 would be exceeded" in err and "rounds fit" in err and "Traceback" not in err
    assert not (tmp_path / "summary.json").exists() and not (tmp_path / "metrics.jsonl").exists()


def test_simulate_names_a_bad_key(repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "simulate",
            str(repo_root / "configs" / "sinusoid.yaml"),
            "--out",
            str(tmp_path),
            "--quiet",
            "--set",
            "federation.max_retries=-1",
        ]
    )
    assert rc == 2 and "federation.max_retries" in capsys.readouterr().err
