"""Test-wide settings: offline Flower, project-controlled FLWR_HOME, no threads oversubscription."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from fedmeta.flower.env import configure_environment

_HOME = Path(tempfile.gettempdir()) / f"fedmeta-tests-{os.getpid()}"
# before any test module imports flwr or ray (each variable only if not set already)
configure_environment(flwr_home=_HOME / "flwr", ray_tmpdir=_HOME / "ray")
os.environ.setdefault("MPLBACKEND", "Agg")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root (configs/ lives there)."""
    return REPO
