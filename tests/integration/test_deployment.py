"""A real Flower deployment on 127.0.0.1: SuperLink + three SuperNodes with TLS and node authentication.

One deployment (module fixture) serves every test, in this order: an uninterrupted reference run
(which also shows that an unregistered key is refused), a run in which a SuperNode is killed,
and a run whose server side is killed after round 1 and resumed. Each round costs seconds on
loopback (an idle SuperNode polls every 3 s, a fresh ``flwr-clientapp`` process per message), so
runs are two rounds long. Every wait is on an event (a metrics row, a SuperNode's log line, the
run's summary, a process exit) and bounded; the fixture stops every process whatever happens.
"""

from __future__ import annotations

import functools
import json
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import Config, load_config
from fedmeta.datagen import make_sites
from fedmeta.errors import DeploymentError
from fedmeta.experiment import Experiment
from fedmeta.federation import combine_eval_metrics, evaluate_on_client
from fedmeta.flower.deploy.certs import make_node_key, make_tls
from fedmeta.flower.deploy.local import (
    FINISHED_COMPLETED,
    LocalDeployment,
    deployment_config,
    start_sites,
    written_since,
)
from fedmeta.flower.run_config import RunOptions, run_config_for
from fedmeta.outputs import read_metrics

pytestmark = pytest.mark.slow

SITES = 3
RUN_TIMEOUT = 600.0


@dataclass
class Federation:
    """The module's deployment and what the tests need to know about it."""

    deployment: LocalDeployment
    node_ids: dict[str, int | None]
    sites: list[Path]
    cfg: Config
    database: Path
    root: Path
    submitted: dict[Path, float] = field(default_factory=dict)  # out-dir -> time.time() of its last submission


def _base_config(repo_root: Path) -> Config:
    # MAML on sinusoid sites, 5 tasks per site and round; a larger server step than the paper's
    # so that two rounds visibly learn. round_timeout bounds a round with a dead node.
    return load_config(
        repo_root / "configs" / "sinusoid.yaml",
        [
            "federation.rounds=2",
            "meta.outer_lr=0.02",
            "eval.tasks=30",
            "federation.round_timeout=45",
            "federation.join_timeout=120",
        ],
    )


@pytest.fixture(scope="module")
def federation(repo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deployment")
    base = _base_config(repo_root)
    sites = [p.resolve() for p in make_sites(base, SITES, root / "sites")]
    tls = make_tls(root / "pki")
    database = root / "superlink.db"  # registered keys survive a SuperLink restart
    with LocalDeployment(root / "work", app_dir=repo_root, tls=tls, node_auth=True) as deployment:
        deployment.start_superlink(database=database)
        ids = start_sites(deployment, sites, keys_dir=root / "keys")
        yield Federation(deployment, ids, sites, deployment_config(base, SITES), database, root)


def _submit(fed: Federation, cfg: Config, out: Path, *, resume: bool = False) -> int:
    fed.submitted[out.resolve()] = time.time()
    return fed.deployment.submit(run_config_for(cfg, RunOptions(out_dir=str(out), resume=resume)))


def _train_rows(out: Path) -> list[dict[str, Any]]:
    return [r for r in read_metrics(out / "metrics.jsonl") if "replies" in r]


class _RunWatch:
    """Polls a run's status (``flwr ls``, a process of its own) in a background thread, so that a
    test waiting for an event polls its file every 50 ms and reacts at once, never blocked behind
    a status query; the status only serves to fail early if the run ends before the event."""

    def __init__(self, fed: Federation, run_id: int) -> None:
        self.fed, self.run_id = fed, run_id
        self.ended = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(10.0):
            try:
                status = self.fed.deployment.run_status(self.run_id)
            except DeploymentError:
                continue  # e.g. the SuperLink being stopped by the test
            if status.startswith("finished"):
                self.ended = status
                return

    def until(self, event: Callable[[], bool], what: str, timeout: float = 300.0) -> None:
        """Wait until ``event()`` holds; fail if the run ends first or after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        try:
            while not event():
                if self.ended and not event():
                    logs = self.fed.deployment.run_logs(self.run_id)[-3000:]
                    pytest.fail(f"run {self.run_id} ended ({self.ended}) before {what}:\n{logs}")
                if time.monotonic() > deadline:
                    link = self.fed.deployment.superlink
                    pytest.fail(f"{what} not seen within {timeout:g}s; SuperLink log:\n{link.tail() if link else ''}")
                time.sleep(0.05)
        finally:
            self._stop.set()


def _wait_rows(fed: Federation, run_id: int, out: Path, count: int, timeout: float = 300.0) -> None:
    """Wait until ``count`` rounds are logged (the checkpoint is written before the row)."""
    _RunWatch(fed, run_id).until(lambda: len(_train_rows(out)) >= count, f"round {count} of run {run_id}", timeout)


def _sent_train_reply(log_path: Path, offset: int, run_id: int, round_idx: int) -> bool:
    """True once a SuperNode's log (from byte ``offset``) shows its train reply of ``round_idx`` in run ``run_id`` sent.

    Flower's SuperNode logs ``[RUN r, ROUND g]``, ``Sending: train message (...)`` and, once the
    reply and its objects are at the SuperLink, ``Sent successfully``.
    """
    with log_path.open("rb") as fh:
        fh.seek(offset)
        lines = fh.read().decode(errors="replace").splitlines()
    header, sending = f"[RUN {run_id}, ROUND {round_idx}]", False
    for prev, line in zip(["", *lines], lines):
        if "Sending: train message" in line:
            sending = header in prev
        elif "Sent successfully" in line and sending:
            return True
    return False


def _finish(fed: Federation, run_id: int, out: Path) -> None:
    # status queries (a `flwr ls` process each) every 10 s until the ServerApp has written the
    # run's summary (its last output), then every 0.5 s
    ending = functools.partial(written_since, out / "summary.json", fed.submitted[out.resolve()])
    status = fed.deployment.wait_run(run_id, timeout=RUN_TIMEOUT, interval=0.5, ending=ending)
    # `flwr run` exits 0 even for a failed run: the SuperLink's status is what counts
    assert status == FINISHED_COMPLETED, f"{status}\n{fed.deployment.run_logs(run_id)[-3000:]}"


def _ensure_all_online(fed: Federation) -> None:
    """Restart any SuperNode a previous test left dead, so that each test starts from three."""
    for name, node in fed.deployment.nodes.items():
        if name.startswith("site-") and not node.process.alive:
            fed.deployment.restart_supernode(name, node_id=fed.node_ids[name])
    fed.deployment.wait_nodes_online(SITES, timeout=180)


@pytest.fixture(scope="module")
def reference_run(federation: Federation) -> Path:
    """An uninterrupted two-round run over the three sites."""
    _ensure_all_online(federation)
    out = federation.root / "reference"
    _finish(federation, _submit(federation, federation.cfg, out), out)
    return out


def _clients_eval(cfg: Config, sites: list[Path], meta: dict[str, torch.Tensor]) -> dict[str, Any]:
    """What the sites' evaluate handlers compute, in this process (same tasks for a seed)."""
    per_client = -(-cfg.eval.tasks // len(sites))
    results = [
        evaluate_on_client(Experiment(cfg, data_dir=str(site)), meta, c, num_tasks=per_client)
        for c, site in enumerate(sites)
    ]
    return combine_eval_metrics(results)


def test_tls_node_auth_run_completes_learns_and_refuses_unregistered_node(
    federation: Federation, reference_run: Path, tmp_path: Path
) -> None:
    fed, out = federation, reference_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2 and summary["clients_total"] == SITES
    rows = _train_rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["replies"] == SITES and r["failed"] == 0 and r["rejected"] == 0 for r in rows)
    assert summary["federation"]["clients_registered"] == SITES

    # Learns: on the sites' held-out tasks (federated evaluation), the trained initialization
    # adapts better than the initial one does on exactly the same tasks. Two Adam steps of 0.02
    # take the 10-step post-adaptation MSE from ~5.8 to ~4.9; 0.9 leaves room for small changes.
    final = summary["final"]
    assert final["source"] == "clients" and final["clients"] == SITES
    start = _clients_eval(fed.cfg, fed.sites, Experiment(fed.cfg, data_dir=str(fed.sites[0])).initial_meta_params())
    assert final["post_adapt_loss"] < 0.9 * start["post_adapt_loss"], (final, start)
    assert final["pre_adapt_loss"] < start["pre_adapt_loss"]

    # The same math as the centralized reference on the same site folders (one process, server
    # holding every site): the deployment's meta-parameters agree to float32 round-off.
    ref_cfg = replace(
        fed.cfg,
        task=replace(fed.cfg.task, data_dir=str(fed.sites[0].parent)),
        eval=replace(fed.cfg.eval, server=True, clients=0),
    )
    run_centralized(ref_cfg, tmp_path / "centralized")
    deployed = load_checkpoint(out / "checkpoint.pt")
    reference = load_checkpoint(tmp_path / "centralized" / "checkpoint.pt")
    assert deployed["round"] == reference["round"] == 2
    for key, value in reference["meta_params"].items():
        torch.testing.assert_close(deployed["meta_params"][key], value, rtol=1e-5, atol=1e-6)

    # A node whose key was never registered is refused by the SuperLink (Flower exit code 305)
    # and never appears among the nodes.
    intruder = make_node_key(tmp_path / "intruder", comment="intruder")
    proc = fed.deployment.start_supernode(
        "intruder", node_config={"data-dir": str(fed.sites[0]), "client-id": 0}, key=intruder.private
    )
    proc.popen.wait(timeout=120)
    assert proc.returncode != 0
    assert "Exit Code: 305" in proc.tail(5000)
    statuses = fed.deployment.node_statuses()
    assert set(statuses) == {i for i in fed.node_ids.values() if i is not None}
    assert sum(s == "online" for s in statuses.values()) == SITES


def test_supernode_killed_mid_run_is_skipped_and_can_rejoin(federation: Federation) -> None:
    fed = federation
    _ensure_all_online(fed)
    cfg = replace(fed.cfg, federation=replace(fed.cfg.federation, min_replies=2))
    out = fed.root / "dropout"
    node_log = fed.deployment.nodes["site-0002"].process.log_path
    offset = node_log.stat().st_size
    run_id = _submit(fed, cfg, out)
    # Killed the moment its round-1 reply is at the SuperLink: round 2's message to it cannot
    # exist before the server has that reply, and the node only pulls again after Flower's 3 s
    # idle sleep and must start a fresh ClientApp to answer, so it never answers round 2.
    _RunWatch(fed, run_id).until(
        lambda: _sent_train_reply(node_log, offset, run_id, 1), f"site-0002's round-1 reply in run {run_id}"
    )
    fed.deployment.stop_supernode("site-0002", kill=True)  # SIGKILL: the node and its ClientApp die
    _finish(fed, run_id, out)

    rows = _train_rows(out)
    assert [r["round"] for r in rows] == [1, 2]
    assert rows[0]["replies"] == SITES
    # round 2: client 2's node is gone; the round completes with the two others
    assert rows[1]["replies"] == 2 and rows[1]["failed"] + rows[1]["unavailable"] == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds_completed"] == 2
    assert summary["final"]["clients"] == 2  # the federated evaluation skipped it too
    assert load_checkpoint(out / "checkpoint.pt")["round"] == 2

    # the site comes back with the same key and is the same registered node again
    fed.deployment.restart_supernode("site-0002", node_id=fed.node_ids["site-0002"])
    assert fed.deployment.node_statuses()[fed.node_ids["site-0002"]] == "online"  # type: ignore[index]


def _assert_same(a: Any, b: Any, where: str = "state") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), where
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_server_side_stopped_after_round_1_resumes_at_round_2_with_identical_state(
    federation: Federation, reference_run: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fed = federation
    _ensure_all_online(fed)  # the node killed by the previous test has rejoined
    out = fed.root / "resumed"
    run_id = _submit(fed, fed.cfg, out)
    _wait_rows(fed, run_id, out, 1)
    port = fed.deployment.port
    fed.deployment.stop_superlink(kill=True)  # SIGKILL to the SuperLink and its ServerApp process
    assert load_checkpoint(out / "checkpoint.pt")["round"] == 1

    # the operator starts the server side again (same address, same state database): the
    # SuperNodes, which kept retrying, reconnect; the run is submitted again with resume
    fed.deployment.start_superlink(database=fed.database, port=port)
    fed.deployment.wait_nodes_online(SITES, timeout=180)
    with caplog.at_level("WARNING", logger="fedmeta.flower.deploy.local"):
        resumed_id = _submit(fed, fed.cfg, out, resume=True)
    # the killed run is over before the resumed one starts: the resumed submission stopped it,
    # unless the SuperLink had already failed it for its missing heartbeats (2 x 30 s after the last)
    killed = fed.deployment.run_status(run_id)
    assert killed in ("finished:stopped", "finished:failed"), killed
    if killed == "finished:stopped":
        assert f"run {run_id} into {out.resolve()} is still 'running': stopping it" in caplog.text
    _finish(fed, resumed_id, out)
    assert fed.deployment.run_status(run_id) == killed  # the killed run is not left running

    rows = _train_rows(out)
    assert [r["round"] for r in rows] == [1, 2]  # round 1 is not redone, nothing counted twice
    assert all(r["replies"] == SITES for r in rows)
    reference_rows = _train_rows(reference_run)
    assert rows[1]["train"] == reference_rows[1]["train"]

    resumed, uninterrupted = load_checkpoint(out / "checkpoint.pt"), load_checkpoint(reference_run / "checkpoint.pt")
    assert resumed["round"] == uninterrupted["round"] == 2
    # identical meta-parameters, Adam moments and step counts, accountant slot and totals
    _assert_same(resumed["meta_params"], uninterrupted["meta_params"], "meta_params")
    _assert_same(resumed["optimizer"], uninterrupted["optimizer"], "optimizer")
    _assert_same(resumed["accountant"], uninterrupted["accountant"], "accountant")
    _assert_same(resumed["extra"]["totals"], uninterrupted["extra"]["totals"], "totals")
