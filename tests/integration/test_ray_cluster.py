"""``fedmeta simulate`` on a two-node Ray cluster (Flower's multi-node route), both nodes on 127.0.0.1.

A head (``ray start --head``, no CPUs for tasks: it only drives) and a second node (``ray start
--address``, one CPU); the simulation joins the cluster, so all client work must run on the second
node. A client mod records, in every
message it handles, the ``FEDMETA_RAY_NODE`` environment the node's processes inherited from its
``ray start``. Both nodes run with ``--block`` and are stopped at the end (nothing else on the
machine is touched).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import pytest

from fedmeta.config import load_config

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
STARTUP_S = 120


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RecordNode:
    """A client mod writing the node's ``FEDMETA_RAY_NODE`` to ``path`` (one line per message)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, message: Any, context: Any, call_next: Any) -> Any:
        with self.path.open("a", encoding="utf-8") as f:
            f.write(f"{os.environ.get('FEDMETA_RAY_NODE', 'unknown')} {os.getpid()}\n")
        return call_next(message, context)


def _start(args: list[str], tag: str, log: Path, tmp: Path, ray_tmp: Path) -> subprocess.Popen[bytes]:
    # the cluster's own RAY_TMPDIR: `ray start --head` records its address there (ray_current_cluster), and a
    # later plain ray.init() of this test session (a local simulation) must not find it and join a dead cluster
    env = {**os.environ, "FEDMETA_RAY_NODE": tag, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(ray_tmp)}
    return subprocess.Popen(
        [str(RAY), "start", "--block", "--disable-usage-stats", *args],
        env=env, stdout=log.open("wb"), stderr=subprocess.STDOUT, start_new_session=True, cwd=tmp,
    )  # fmt: skip


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def _wait_for_nodes(address: str, nodes: int, procs: list[subprocess.Popen[bytes]]) -> None:
    """Until the cluster at ``address`` lists ``nodes`` alive nodes (a node process that exits fails the test)."""
    deadline = time.monotonic() + STARTUP_S
    probe = (
        "import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
        "print(sum(n['Alive'] for n in ray.nodes()))"
    )
    while time.monotonic() < deadline:
        for p in procs:
            assert p.poll() is None, "a ray start process ended early (see its log in the test's tmp dir)"
        out = subprocess.run([sys.executable, "-c", probe, address], capture_output=True, text=True, timeout=60)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(nodes)]:
            return
        time.sleep(1.0)
    pytest.fail(f"the Ray cluster at {address} did not list {nodes} nodes within {STARTUP_S} s")


@pytest.mark.skipif(not RAY.exists(), reason="the ray command is not installed next to this Python")
def test_simulation_runs_its_clients_on_the_second_node_of_a_local_ray_cluster(repo_root: Path, tmp_path: Path) -> None:
    from fedmeta.flower.simulation import simulate

    port = _free_port()
    address = f"127.0.0.1:{port}"
    ray_tmp = Path(tempfile.gettempdir()) / f"frc{port}"  # short: Ray's socket paths have a length limit
    head = _start(
        ["--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--include-dashboard=false", "--num-cpus=0"],
        "head", tmp_path / "head.log", tmp_path, ray_tmp,
    )  # fmt: skip
    procs = [head]
    try:
        _wait_for_nodes(address, 1, procs)
        worker = _start(
            [f"--address={address}", "--node-ip-address=127.0.0.1", "--num-cpus=1"],
            "worker", tmp_path / "worker.log", tmp_path, ray_tmp,
        )  # fmt: skip
        procs.append(worker)
        _wait_for_nodes(address, 2, procs)
        cfg = load_config(
            repo_root / "configs" / "sinusoid.yaml",
            ["federation.clients_total=20", "federation.clients_per_round=4", "federation.rounds=2",
             "meta.tasks_per_client=2", "eval.tasks=20", "eval.every=2", "eval.steps=2"],
        )  # fmt: skip
        seen = tmp_path / "nodes.txt"
        summary = simulate(
            cfg, tmp_path / "run", ray_address=address, client_mods=[RecordNode(seen)],
        )  # fmt: skip
        assert summary["rounds_completed"] == 2
        lines = seen.read_text(encoding="utf-8").split("\n")[:-1]
        # the start-up query and two rounds of training, at least: all of it on the second node
        assert len(lines) >= 3 and {line.split()[0] for line in lines} == {"worker"}
    finally:
        for p in reversed(procs):
            _stop(p)
        shutil.rmtree(ray_tmp, ignore_errors=True)
