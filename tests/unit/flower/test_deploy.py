"""Deployment helpers that need no Flower processes: configs, site folders, process groups,
signals, and a server that builds its model from the sites' start-up answers."""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from fedmeta.config import config_from_dict, load_config
from fedmeta.errors import ConfigError, DeploymentError, InconsistentReplies
from fedmeta.experiment import Experiment
from fedmeta.federation import (
    ClientIdentity,
    RoundLoop,
    SiteLayoutFamily,
    describe_client,
    needs_site_layout,
    site_layout,
)
from fedmeta.flower.deploy.local import (
    TASK_POLL_INTERVAL,
    LocalDeployment,
    ManagedProcess,
    deployment_config,
    flower_env,
    prepare_sites,
    terminate_on_signals,
    written_since,
)


@pytest.fixture()
def sinusoid(repo_root: Path):  # type: ignore[no-untyped-def]
    return load_config(repo_root / "configs" / "sinusoid.yaml", ["eval.tasks=10"])


def test_deployment_config_has_one_client_per_site_and_no_server_data(sinusoid) -> None:  # type: ignore[no-untyped-def]
    cfg = replace(sinusoid, federation=replace(sinusoid.federation, min_replies=4))
    d = deployment_config(cfg, 3)
    assert d.task.name == "folder" and d.task.data_dir is None and needs_site_layout(d)
    assert (d.federation.clients_total, d.federation.clients_per_round, d.federation.min_replies) == (3, 3, 3)
    assert d.eval.server is False and d.eval.clients == 3
    assert d.meta == cfg.meta and d.seed == cfg.seed
    with pytest.raises(ConfigError, match="--sites"):
        deployment_config(cfg, 0)


def test_folder_without_data_dir_needs_evaluation_through_the_sites() -> None:
    with pytest.raises(ConfigError, match="task.data_dir"):
        config_from_dict({"task": {"name": "folder"}})
    with pytest.raises(ConfigError, match="eval.server"):
        config_from_dict({"task": {"name": "folder"}, "eval": {"server": False}})
    cfg = config_from_dict(
        {
            "task": {"name": "folder"},
            "eval": {"server": False, "clients": 2},
            "federation": {"clients_total": 2, "clients_per_round": 2},
        }
    )
    assert needs_site_layout(cfg)


def test_prepare_sites_writes_then_reuses_and_checks_counts(sinusoid, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sites = prepare_sites(sinusoid, 2, tmp_path / "sites")
    assert [p.name for p in sites] == ["site-0000", "site-0001"] and all((p / "heldout").is_dir() for p in sites)
    stamp = (sites[0] / "tasks").stat().st_mtime_ns
    assert prepare_sites(sinusoid, 2, tmp_path / "sites") == sites
    assert (sites[0] / "tasks").stat().st_mtime_ns == stamp  # reused, not rewritten
    assert prepare_sites(sinusoid, 1, tmp_path / "elsewhere", data=tmp_path / "sites") == sites[:1]
    with pytest.raises(ConfigError, match="holds only 2"):
        prepare_sites(sinusoid, 3, tmp_path / "x", data=tmp_path / "sites")
    folder = replace(
        sinusoid,
        task=replace(sinusoid.task, name="folder", data_dir=None),
        eval=replace(sinusoid.eval, server=False, clients=1),
    )
    with pytest.raises(ConfigError, match="--data"):
        prepare_sites(folder, 2, tmp_path / "y")
    with pytest.raises(ConfigError, match="--sites"):
        prepare_sites(sinusoid, None, tmp_path / "z")


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    # zombies of an exited group still answer signal 0 until reaped; look at their state
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _wait_children(proc: ManagedProcess, count: int, timeout: float = 30.0) -> list[int]:
    """The process's descendants once there are ``count`` of them (bounded wait)."""
    from fedmeta.flower.deploy.local import _descendants

    deadline = time.monotonic() + timeout
    tree = [pid for pid, _ in _descendants(proc.pid)]
    while len(tree) < count and time.monotonic() < deadline:
        time.sleep(0.05)
        tree = [pid for pid, _ in _descendants(proc.pid)]
    assert len(tree) >= count, f"{proc.name} started {len(tree)} of {count} children within {timeout:g}s"
    return tree


def test_managed_process_stop_ends_the_group_and_descendants_in_other_sessions(tmp_path: Path) -> None:
    # a leader that ignores SIGTERM, a child in its group, and a child in a session of its own
    # (as Flower's SuperLink starts flower-superexec): all must go
    script = "trap '' TERM; setsid sleep 301 & sleep 300 & wait"
    proc = ManagedProcess(
        "stubborn", ["bash", "-c", script], env=flower_env(tmp_path / "home"), log_path=tmp_path / "p.log", cwd=tmp_path
    )
    tree = _wait_children(proc, 2)  # both children started
    assert proc.alive and _group_alive(proc.pid) and len(tree) == 2
    assert any(os.getsid(pid) != os.getsid(proc.pid) for pid in tree)  # one escaped the session
    proc.stop(timeout=1.0)
    assert proc.returncode == -signal.SIGKILL  # it ignored SIGTERM: killed once the timeout passed
    deadline = time.monotonic() + 10  # SIGKILL is delivered asynchronously: give the kernel a moment
    while (_group_alive(proc.pid) or any(_alive(pid) for pid in tree)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid)
    assert not any(_alive(pid) for pid in tree)
    assert "sleep 300" in proc.tail()


def test_managed_process_kill_is_immediate(tmp_path: Path) -> None:
    proc = ManagedProcess(
        "victim",
        ["bash", "-c", "sleep 300 & sleep 300"],
        env=flower_env(tmp_path / "home"),
        log_path=tmp_path / "v.log",
        cwd=tmp_path,
    )
    children = _wait_children(proc, 1)  # the background sleep has started: there is a group to kill
    proc.kill()
    assert proc.returncode == -signal.SIGKILL
    deadline = time.monotonic() + 10
    while (_group_alive(proc.pid) or any(_alive(pid) for pid in children)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _group_alive(proc.pid)
    assert not any(_alive(pid) for pid in children)


def test_flower_env_is_offline_and_local(tmp_path: Path) -> None:
    env = flower_env(tmp_path / "h")
    assert env["FLWR_HOME"] == str((tmp_path / "h").resolve())
    assert env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


def test_flower_env_polls_for_app_tasks_often_unless_the_environment_says(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    assert flower_env(tmp_path / "h")["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == TASK_POLL_INTERVAL == "0.2"
    monkeypatch.setenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "2.5")
    assert flower_env(tmp_path / "h")["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "2.5"


def test_sigterm_becomes_keyboard_interrupt_inside_the_block() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(KeyboardInterrupt), terminate_on_signals():
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
    assert signal.getsignal(signal.SIGTERM) is before


def test_node_authentication_requires_tls(tmp_path: Path, repo_root: Path) -> None:
    with pytest.raises(DeploymentError, match="needs TLS"):
        LocalDeployment(tmp_path, app_dir=repo_root, tls=None, node_auth=True)


def test_deploy_local_refuses_node_auth_without_tls(sinusoid, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    from fedmeta.flower.deploy.local import run_local

    with pytest.raises(ConfigError, match="needs TLS"):
        run_local(sinusoid, tmp_path, sites=1, tls=False, node_auth=True)


# -- a server without site data ----------------------------------------------------------------


def _ident(
    cid: int, shape: tuple[int, ...], site: str = "", kind: str = "regression", outputs: int = 1
) -> ClientIdentity:
    return ClientIdentity(cid, kind, 5, site, shape, outputs)


def test_site_layout_follows_the_majority_then_the_lowest_client() -> None:
    fam = site_layout([_ident(2, (1,)), _ident(0, (2,)), _ident(1, (1,))])
    assert (fam.kind, fam.input_shape, fam.output_dim) == ("regression", (1,), 1)
    tie = site_layout([_ident(5, (1,)), _ident(3, (2,))])
    assert tie.input_shape == (2,)
    assert site_layout(list(reversed([_ident(5, (1,)), _ident(3, (2,))]))).input_shape == (2,)
    with pytest.raises(InconsistentReplies, match="no site described"):
        site_layout([ClientIdentity(0, "regression", 0, "", (), 0)])


def test_server_builds_its_model_from_the_sites_and_refuses_mismatched_ones(sinusoid, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    sites = prepare_sites(sinusoid, 2, tmp_path / "sites")
    cfg = deployment_config(sinusoid, 2)
    # what each site says at start-up, computed as its ClientApp does
    answers = [describe_client(Experiment(cfg, data_dir=str(s)), c, str(s)) for c, s in enumerate(sites)]
    family = site_layout(answers)
    server = RoundLoop(cfg, tmp_path / "out", experiment=Experiment(cfg, family=family))
    site_exp = Experiment(cfg, data_dir=str(sites[0]))
    assert server.exp.model.param_shapes == site_exp.model.param_shapes
    assert {k: tuple(v.shape) for k, v in server.meta.items()} == {
        k: tuple(v.shape) for k, v in site_exp.initial_meta_params().items()
    }
    directory = server.directory()
    assert directory.register(101, answers[0]) is None
    assert "shape" in (directory.register(102, _ident(1, (3,))) or "")
    with pytest.raises(ConfigError, match="holds no task data"):
        server.exp.source.eval_tasks()
    assert isinstance(server.exp.source.family(None), SiteLayoutFamily)


# -- a resumed run takes over its out-dir ------------------------------------------------------


class _FakeSuperLink:
    """Answers ``LocalDeployment.flwr`` as a SuperLink would, and records the commands."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.status: dict[int, str] = {}
        self.stop_takes_effect = True

    def __call__(self, args: Sequence[str], *, timeout: float = 120.0, check: bool = True) -> dict[str, Any]:
        self.calls.append(list(args))
        if args[0] == "run":
            run_id = len(self.status) + 1
            self.status[run_id] = "running"
            return {"success": True, "run-id": run_id}
        if args[0] == "ls":
            ids = [int(args[args.index("--run-id") + 1])] if "--run-id" in args else sorted(self.status)
            runs = [{"run-id": str(i), "status": self.status[i]} for i in ids if i in self.status]
            return {"success": True, "runs": runs}
        if args[0] == "stop":
            if not self.stop_takes_effect:
                return {"success": False, "error-message": "no {such} luck"}
            self.status[int(args[1])] = "finished:stopped"
            return {"success": True}
        raise AssertionError(f"unexpected flwr {args}")

    def commands(self) -> list[tuple[str, ...]]:
        return [tuple(a for a in c if not a.startswith("/") and a != "fedmeta-deploy") for c in self.calls]


def _config(out: Path, *, resume: bool) -> dict[str, Any]:
    return {"config-yaml": "", "out-dir": str(out), "resume": resume}


def test_resumed_submission_stops_the_unfinished_run_into_the_same_out_dir(
    tmp_path: Path, repo_root: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = LocalDeployment(tmp_path / "work", app_dir=repo_root)
    fake = _FakeSuperLink()
    monkeypatch.setattr(deployment, "flwr", fake)
    killed = deployment.submit(_config(tmp_path / "a", resume=False))
    other = deployment.submit(_config(tmp_path / "b", resume=False))
    fake.status[3] = "running"  # a run of someone else, into no folder this deployment knows
    fake.calls.clear()

    with caplog.at_level("WARNING", logger="fedmeta.flower.deploy.local"):
        resumed = deployment.submit(_config(tmp_path / "a" / ".." / "a", resume=True))
    # the killed run into the same folder is stopped, and only then the resumed run submitted
    assert fake.commands() == [("ls",), ("stop", str(killed)), ("ls", "--run-id", str(killed)), ("run", "--run-config")]
    assert fake.status[killed] == "finished:stopped"
    assert fake.status[other] == fake.status[3] == "running"
    assert resumed == 4
    assert f"run {killed} into {(tmp_path / 'a').resolve()} is still 'running': stopping it" in caplog.text

    # a run already finished (Flower expired it) is left as it is; a fresh run stops nothing
    fake.status[resumed] = "finished:failed"
    fake.calls.clear()
    deployment.submit(_config(tmp_path / "a", resume=True))
    deployment.submit(_config(tmp_path / "b", resume=False))
    assert [c[0] for c in fake.commands()] == ["ls", "run", "run"]
    assert fake.status[other] == "running"
    deployment.close()


def test_a_run_that_does_not_stop_fails_the_resumed_submission(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = LocalDeployment(tmp_path / "work", app_dir=repo_root)
    fake = _FakeSuperLink()
    fake.stop_takes_effect = False
    monkeypatch.setattr(deployment, "flwr", fake)
    deployment.submit(_config(tmp_path / "a", resume=False))
    with pytest.raises(DeploymentError, match=r"run 1 to finish after `flwr stop` \(refused: no \{such\} luck"):
        deployment.stop_runs_writing_to(tmp_path / "a", timeout=0.0)
    assert [c[0] for c in fake.commands()] == ["run", "ls", "stop", "ls"]
    deployment.close()


def test_wait_run_queries_the_status_rarely_until_the_run_is_ending(
    tmp_path: Path, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    deployment = LocalDeployment(tmp_path / "work", app_dir=repo_root)
    fake = _FakeSuperLink()
    monkeypatch.setattr(deployment, "flwr", fake)
    run_id = deployment.submit(_config(tmp_path / "a", resume=False))
    summary = tmp_path / "a" / "summary.json"
    since = time.time()
    polls = [0]

    def on_poll() -> None:  # the ServerApp writes its summary on the 5th poll and finishes on the 8th
        polls[0] += 1
        if polls[0] == 5:
            summary.parent.mkdir(parents=True, exist_ok=True)
            summary.write_text("{}")
        if polls[0] == 8:
            fake.status[run_id] = "finished:completed"

    fake.calls.clear()
    status = deployment.wait_run(
        run_id, timeout=60, interval=0.0, on_poll=on_poll, ending=lambda: written_since(summary, since),
        idle_interval=3600,
    )  # fmt: skip
    assert status == "finished:completed"
    # one status query at the start (a failed run is noticed), none until the summary appeared,
    # then one per poll until the run is listed as finished
    assert polls[0] == 8 and len(fake.calls) == 1 + 4
    assert not written_since(summary, time.time() + 60)
    assert not written_since(tmp_path / "missing.json", 0.0)
