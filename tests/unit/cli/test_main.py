"""The command line: outputs, exit codes, and one-paragraph errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedmeta.cli import main


def test_centralized_command_writes_outputs(
    tmp_path: Path, repo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    code = main(
        [
            "centralized",
            str(repo_root / "configs/sinusoid.yaml"),
            "--out",
            str(out),
            "--quiet",
            "--set",
            "federation.rounds=5",
            "eval.tasks=20",
            "eval.every=5",
        ]
    )
    assert code == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 5 and summary["algorithm"] == "maml"
    assert "held-out loss" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (["--set", "meta.inner_lrr=1"], 2, "unknown config key 'meta.inner_lrr'"),
        (["--set", "federation.rounds=-3"], 2, "'federation.rounds'"),
    ],
)
def test_bad_input_gets_a_clear_error(
    tmp_path: Path, repo_root: Path, capsys: pytest.CaptureFixture[str], args: list[str], code: int, needle: str
) -> None:
    rc = main(["centralized", str(repo_root / "configs/sinusoid.yaml"), "--out", str(tmp_path / "x"), "--quiet", *args])
    err = capsys.readouterr().err
    assert rc == code and needle in err and "Traceback" not in err


def test_bad_yaml_file_via_subprocess(tmp_path: Path) -> None:
    """The real console entry point: exit status and message, no traceback."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: [unclosed\n")
    proc = subprocess.run(
        [sys.executable, "-m", "fedmeta.cli", "centralized", str(bad), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "bad.yaml' is not valid YAML at line" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists(), "nothing is written for a config that does not load"


def test_debug_shows_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["centralized", str(tmp_path / "missing.yaml"), "--debug"])
    assert rc == 2 and "Traceback" in capsys.readouterr().err


def test_make_data_writes_sites_the_folder_family_reads(tmp_path: Path, repo_root: Path) -> None:
    rc = main(
        [
            "make-data",
            str(repo_root / "configs/sinusoid.yaml"),
            "--sites",
            "3",
            "--out",
            str(tmp_path / "sites"),
            "--quiet",
        ]
    )
    assert rc == 0
    sites = sorted((tmp_path / "sites").iterdir())
    assert [s.name for s in sites] == ["site-0000", "site-0001", "site-0002"]
    out = tmp_path / "run"
    rc = main([
        "centralized", str(repo_root / "configs/sinusoid.yaml"), "--out", str(out), "--quiet",
        "--set", "task.name=folder", f"task.data_dir={tmp_path / 'sites'}", "federation.clients_total=3",
        "federation.clients_per_round=2", "federation.rounds=3", "eval.tasks=6", "eval.every=3",
    ])
    assert rc == 0 and json.loads((out / "summary.json").read_text())["task"] == "folder"
