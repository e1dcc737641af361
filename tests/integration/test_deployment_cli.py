"""``fedmeta deploy-local`` as a user runs it: interrupted with Ctrl-C, then resumed to the end.

Ctrl-C must leave no Flower process behind (every process of a deployment has its FLWR_HOME
under ``OUT/deploy/homes``, which is how they are found here), keep the last checkpoint, and
``--resume`` must finish the run from it with the usual outputs. The run uses client-level DP
on the server (``client-central``), so the privacy accountant has to survive the interruption
too: the ε after each round must be Opacus' ε for exactly that many rounds.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedmeta.checkpoint import load_checkpoint
from fedmeta.outputs import read_metrics

pytestmark = pytest.mark.slow

FEDMETA = [sys.executable, "-m", "fedmeta.cli"]
SIGMA = 0.8
DELTA = 1e-5  # privacy.delta's default


def _deployment_processes(home_root: Path) -> list[str]:
    """Live processes whose FLWR_HOME lies under ``home_root`` (pid and command)."""
    found = []
    marker = f"FLWR_HOME={home_root}".encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if marker in environ and state != "Z":
            found.append(f"{pid}: {cmd[:200]}")
    return found


def _wait_gone(home_root: Path, timeout: float = 30.0) -> list[str]:
    """The deployment's processes still alive once none is left, or after ``timeout`` seconds.

    SIGKILL is delivered asynchronously: a process killed just before ``fedmeta`` exited may
    still be listed for a moment.
    """
    deadline = time.monotonic() + timeout
    left = _deployment_processes(home_root)
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = _deployment_processes(home_root)
    return left


def test_deploy_local_interrupted_leaves_nothing_running_and_resumes(repo_root: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "deploy-local", str(repo_root / "configs" / "sinusoid.yaml"), "--sites", "2", "--out", str(out),
        "--set", "federation.rounds=2", "eval.tasks=20", "federation.round_timeout=90",
        "privacy.mode=client-central", "federation.sampling=poisson", f"privacy.noise_multiplier={SIGMA}",
        "privacy.clip_norm=1.0", "privacy.noise_seed=7", "--quiet",
    ]
    log_path = tmp_path / "first.log"
    with log_path.open("w") as log:
        # a shell's background job inherits SIGINT ignored, which Python then keeps: restore the
        # default in the child so that it reacts to Ctrl-C as in a terminal
        proc = subprocess.Popen(
            [*FEDMETA, *args], cwd=repo_root, stdout=log, stderr=subprocess.STDOUT,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 400
        while not any("replies" in r for r in read_metrics(out / "metrics.jsonl")):
            assert proc.poll() is None, log_path.read_text()[-3000:]
            assert time.monotonic() < deadline, "round 1 did not complete in time:\n" + log_path.read_text()[-3000:]
            time.sleep(0.1)
        homes = out / "deploy" / "homes"
        assert len(_deployment_processes(homes)) >= 3  # SuperLink, two SuperNodes (and the ServerApp)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(timeout=120) == 130, log_path.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    assert _wait_gone(homes) == []
    assert "interrupted" in log_path.read_text()
    assert load_checkpoint(out / "checkpoint.pt")["round"] == 1
    assert (out / "deploy" / "logs" / "superlink.log").is_file()  # kept after a failure

    done = subprocess.run([*FEDMETA, *args, "--resume"], cwd=repo_root, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TLS + node authentication" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["mode"] == "deployment" and summary["rounds_completed"] == 2
    assert summary["deployment"]["resumed"] and summary["deployment"]["tls"] and summary["deployment"]["node_auth"]
    # under DP the server evaluates on its own held-out site, never through the sites' un-noised
    # means (issue 15, finding 4: this was "clients", federated evaluation turned on under DP)
    assert "source" not in summary["final"] and summary["final"]["post_adapt_loss"] > 0
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "replies" in r]
    assert [r["round"] for r in rows] == [1, 2] and all(r["replies"] == 2 for r in rows)
    assert load_checkpoint(out / "checkpoint.pt")["round"] == 2

    # the accountant went on from the checkpoint: nothing lost, nothing counted twice. Both sites
    # join every round (Poisson rate clients_per_round / clients_total = 1).
    from opacus.accountants import RDPAccountant

    def opacus_epsilon(rounds: int) -> float:
        acc = RDPAccountant()
        acc.history = [(SIGMA, 1.0, rounds)]
        return float(acc.get_epsilon(DELTA))

    assert rows[0]["privacy"]["epsilon"] == pytest.approx(opacus_epsilon(1), rel=1e-9)
    assert rows[1]["privacy"]["epsilon"] == pytest.approx(opacus_epsilon(2), rel=1e-9)
    assert summary["privacy"]["epsilon"] == pytest.approx(opacus_epsilon(2), rel=1e-9)
    assert summary["privacy"]["mode"] == "client-central" and summary["privacy"]["delta"] == DELTA
    assert (out / "learning_curves.png").is_file()
    assert not (out / "deploy").exists()  # removed after success (no --keep-logs)
    assert _wait_gone(homes) == []


def test_deploy_local_client_distributed_two_rounds_over_tls(repo_root: Path, tmp_path: Path) -> None:
    """``client-distributed`` in a real deployment (TLS + node authentication): SecAgg+'s four
    exchanges per round over three SuperNodes, every update in the sum, epsilon Opacus' at
    sigma sqrt(n / t) with q = 1."""
    out = tmp_path / "ddp"
    sigma, t = 0.5, 2
    args = [
        "deploy-local", str(repo_root / "configs" / "sinusoid-ddp.yaml"), "--sites", "3", "--out", str(out),
        "--set", "federation.rounds=2", "eval.tasks=20", "federation.round_timeout=90", "meta.outer_lr=0.01",
        f"privacy.noise_multiplier={sigma}", f"privacy.min_survivors={t}", "privacy.noise_seed=7", "--quiet",
    ]  # fmt: skip
    done = subprocess.run([*FEDMETA, *args], cwd=repo_root, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "TLS + node authentication" in done.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["privacy"]["mode"] == "client-distributed"
    rows = [r for r in read_metrics(out / "metrics.jsonl") if "replies" in r]
    assert [r["round"] for r in rows] == [1, 2]
    from opacus.accountants import RDPAccountant

    z = sigma * (3 / t) ** 0.5
    for r, row in enumerate(rows, start=1):
        p = row["privacy"]
        assert p["survivors"] == 3 and p["clipped_coordinates"] == 0 and "sum_check" not in p
        assert row["tasks"] == 0 and row["train"] == {}  # nothing per client reached the server
        acc = RDPAccountant()
        acc.history = [(z, 1.0, r)]
        assert p["epsilon"] == pytest.approx(float(acc.get_epsilon(DELTA)), rel=1e-9)
    assert _wait_gone(out / "deploy" / "homes") == []
