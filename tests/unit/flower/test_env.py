"""Flower's environment is set by an explicit call, never on import; the ``flwr run`` connection file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from fedmeta.flower.env import configure_environment, environment_defaults, write_superlink_connection

#: Library modules that import neither flwr nor ray when imported.
FLOWER_FREE = [
    "fedmeta.flower",
    "fedmeta.flower.env",
    "fedmeta.flower.run_config",
    "fedmeta.flower.simulation",
    "fedmeta.flower.deploy",
    "fedmeta.flower.deploy.local",
    "fedmeta.flower.deploy.certs",
    "fedmeta.cli",
    "fedmeta.cli.main",
    "fedmeta.cli.common",
    "fedmeta.cli.centralized",
    "fedmeta.cli.make_data",
    "fedmeta.cli.simulate",
    "fedmeta.cli.privacy",
    "fedmeta.cli.deploy",
    "fedmeta.cli.adapt",
]
#: Modules that import flwr (and through it grpc, which sets GRPC_VERBOSITY itself).
FLOWER_MODULES = [
    "fedmeta.flower.records",
    "fedmeta.flower.transport",
    "fedmeta.flower.server_app",
    "fedmeta.flower.client_app",
]

_PROBE = """
import importlib, json, os, sys
def changed(before):
    return {k: v for k, v in os.environ.items() if before.get(k) != v}, sorted(set(before) - set(os.environ))
out = {}
before = dict(os.environ)
for name in FLOWER_FREE:
    importlib.import_module(name)
out["library"] = changed(before)
out["flwr_loaded"] = sorted(m for m in ("flwr", "ray", "torch") if m in sys.modules)
import flwr.app, flwr.clientapp, flwr.serverapp, flwr.simulation
before = dict(os.environ)
for name in FLOWER_MODULES:
    importlib.import_module(name)
out["adapter"] = changed(before)
before = dict(os.environ)
import client.app, server.app
out["apps"] = changed(before)
print(json.dumps(out))
"""


def test_importing_the_library_leaves_the_environment_alone(repo_root: Path) -> None:
    # a clean environment: nothing of Flower's or Ray's set, so any import-time default would show
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "PYTHONPATH": str(repo_root)}
    env["HOME"] = os.environ.get("HOME", "/tmp")
    if "TMPDIR" in os.environ:
        env["TMPDIR"] = os.environ["TMPDIR"]  # RAY_TMPDIR's default lies under it
    code = f"FLOWER_FREE = {FLOWER_FREE!r}\nFLOWER_MODULES = {FLOWER_MODULES!r}\n{_PROBE}"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, cwd=repo_root, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["library"] == [{}, []]
    assert out["flwr_loaded"] == []  # the CLI and the Flower-free modules load neither Flower nor torch
    assert out["adapter"] == [{}, []]
    # the shims flwr run loads are entry points: they set exactly the defaults, and only those
    set_by_apps, removed = out["apps"]
    assert removed == []
    assert set_by_apps == environment_defaults(repo_root)


def test_configure_environment_sets_defaults_only_where_unset(tmp_path: Path) -> None:
    env = {"FLWR_HOME": "/somewhere/else", "FLWR_TELEMETRY_ENABLED": "1"}
    changed = configure_environment(ray_tmpdir=tmp_path / "ray", environ=env)
    assert env["FLWR_HOME"] == "/somewhere/else" and env["FLWR_TELEMETRY_ENABLED"] == "1"  # the user's values win
    assert env["RAY_TMPDIR"] == str(tmp_path / "ray")
    assert env["FLWR_DISABLE_UPDATE_CHECK"] == "1" and env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert set(changed) == set(environment_defaults()) - {"FLWR_HOME", "FLWR_TELEMETRY_ENABLED"}
    assert configure_environment(environ=env) == {}  # a second call changes nothing
    fresh: dict[str, str] = {}
    configure_environment(flwr_home=tmp_path / "home", environ=fresh)
    assert fresh["FLWR_HOME"] == str(tmp_path / "home")


def test_connection_file_keeps_other_connections(tmp_path: Path) -> None:
    import tomllib

    write_superlink_connection("lab", "10.0.0.5:9093", home=tmp_path, insecure=True)
    path = write_superlink_connection("fedmeta-local", home=tmp_path)
    data = tomllib.loads(path.read_text(encoding="utf-8"))["superlink"]
    assert data["default"] == "fedmeta-local"
    assert data["lab"] == {"address": "10.0.0.5:9093", "insecure": True}
    assert data["fedmeta-local"] == {"address": ":local:"}


def test_environment_defaults_are_set_before_flower_loads() -> None:
    import os

    for key in ("FLWR_HOME", "RAY_TMPDIR"):
        assert os.environ.get(key)
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
