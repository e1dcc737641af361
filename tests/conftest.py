"""Test-wide settings: offline Flower, project-controlled FLWR_HOME, no threads oversubscription."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

_HOME = Path(tempfile.gettempdir()) / f"fedmeta-tests-{os.getpid()}"
os.environ.setdefault("FLWR_HOME", str(_HOME / "flwr"))
os.environ.setdefault("RAY_TMPDIR", str(_HOME / "ray"))
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
os.environ.setdefault("FLWR_DISABLE_UPDATE_CHECK", "1")
os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (configs/ lives there)."""
    return REPO
