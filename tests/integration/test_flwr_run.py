"""``flwr run .`` against a local simulation SuperLink, with the connection in our own FLWR_HOME."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmeta.flower.env import write_superlink_connection

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _flwr(args: list[str], env: dict[str, str], cwd: Path) -> dict:
    proc = subprocess.run(
        [str(BIN / "flwr"), *args, "--format", "json"], capture_output=True, text=True, env=env, cwd=cwd, timeout=120
    )
    start = proc.stdout.find("{")
    assert start >= 0, proc.stdout + proc.stderr
    return json.loads(proc.stdout[start:])


def test_flwr_run_local_simulation(repo_root: Path, tmp_path: Path) -> None:
    home = tmp_path / "flwr_home"
    port = _free_port()
    env = {
        **os.environ,
        "FLWR_HOME": str(home),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    write_superlink_connection("fedmeta-test", f"127.0.0.1:{port}", home=home, insecure=True)
    log_file = tmp_path / "superlink.log"
    with log_file.open("w") as log:
        superlink = subprocess.Popen(
            [str(BIN / "flower-superlink"), "--insecure", "--simulation", "--host", "127.0.0.1", "--port", str(port)],
            env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT,
        )
    try:
        out = tmp_path / "run"
        overrides = (
            "federation.clients_total=8 federation.clients_per_round=3 federation.rounds=2 eval.tasks=20 eval.every=2"
        )
        started = None
        deadline = time.monotonic() + 60
        while started is None:
            res = _flwr(
                ["run", ".", "fedmeta-test", "--federation-config", "num-supernodes=8",
                 "--run-config", f"overrides='{overrides}' out-dir='{out}'"],
                env, repo_root,
            )
            if res.get("success"):
                started = res["run-id"]
            elif time.monotonic() > deadline:
                pytest.fail(f"flwr run failed: {res}\n{log_file.read_text()[-2000:]}")
            else:
                time.sleep(2)  # the SuperLink may still be starting
        # the run's status (a `flwr ls` process, about a CPU second) every 10 s until the ServerApp
        # has written its summary (its last output), then every 0.5 s until the run is listed finished
        status, checked = "", -math.inf
        deadline = time.monotonic() + 300
        while not status.startswith("finished") and time.monotonic() < deadline:
            time.sleep(0.1)
            if not (out / "summary.json").is_file() and time.monotonic() - checked < 10:
                continue
            if (out / "summary.json").is_file() and time.monotonic() - checked < 0.5:
                continue
            checked = time.monotonic()
            runs = _flwr(["ls", "fedmeta-test", "--run-id", str(started)], env, repo_root).get("runs", [])
            status = runs[0]["status"] if runs else ""
        # flwr run exits 0 even when the run fails: the run's status and outputs are what count
        assert status == "finished:completed", f"{status}\n{log_file.read_text()[-3000:]}"
        summary = json.loads((out / "summary.json").read_text())
        assert summary["rounds_completed"] == 2 and summary["clients_total"] == 8
        assert summary["final"]["post_adapt_loss"] > 0
        assert (out / "checkpoint.pt").is_file()
        assert (home / "config.toml").is_file()  # the connection stayed in our FLWR_HOME
    finally:
        superlink.terminate()
        try:
            superlink.wait(timeout=20)
        except subprocess.TimeoutExpired:
            superlink.kill()
