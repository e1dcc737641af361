"""``fedmeta simulate`` refuses what it cannot do before starting Flower."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmeta.cli import main


def test_simulate_is_registered_and_refuses_unwired_privacy(repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", str(repo_root / "configs" / "sinusoid.yaml"), "--out", str(tmp_path), "--quiet", "--set", "privacy.mode=client-local"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "privacy.mode" in err and "Traceback" not in err
    assert not (tmp_path / "summary.json").exists()


def test_simulate_names_a_bad_key(repo_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["simulate", str(repo_root / "configs" / "sinusoid.yaml"), "--out", str(tmp_path), "--quiet", "--set", "federation.max_retries=-1"])
    assert rc == 2 and "federation.max_retries" in capsys.readouterr().err
