"""Start, watch and stop a Flower deployment (SuperLink + SuperNodes) on one machine.

This is the process management behind ``fedmeta deploy-local`` and the deployment tests. It
drives Flower's own executables — ``flower-superlink``, ``flower-supernode`` and the ``flwr``
CLI — and adds what a scripted deployment needs around them:

* every process gets its own process group, its own ``FLWR_HOME`` under the deployment's work
  folder and the offline environment of :func:`flower_env`; its output goes to a log file;
* listening ports are free ports on 127.0.0.1 chosen at start (retried if another process took
  the port in between);
* every wait is bounded and checks that the processes it waits on are still alive; a failure
  raises :class:`~fedmeta.errors.DeploymentError` with the tail of the relevant log;
* :meth:`LocalDeployment.close` stops every process group it started (SIGTERM, then SIGKILL),
  including the ``flwr-serverapp`` / ``flwr-clientapp`` children Flower spawns. It runs on
  ``with`` exit, from ``atexit``, and — with :func:`terminate_on_signals` — on SIGTERM/SIGHUP.
  On Linux the children also get SIGTERM if this process dies without cleaning up
  (``PR_SET_PDEATHSIG``);
* a run's real outcome comes from ``flwr ls --run-id ID --format json`` (``flwr run --stream``
  exits 0 even when the run failed);
* a resumed run first stops (``flwr stop``) any earlier run into the same ``out-dir`` that the
  SuperLink still lists as unfinished, e.g. one whose ServerApp died with the SuperLink.

Nothing here is fedmeta-specific except the defaults; the Flower app is whatever ``app_dir``
holds (its ``pyproject.toml``).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedmeta.config import Config
from fedmeta.errors import ConfigError, DeploymentError
from fedmeta.flower.deploy.certs import TlsFiles

__all__ = [
    "BIN",
    "ManagedProcess",
    "LocalDeployment",
    "flower_env",
    "free_port",
    "terminate_on_signals",
    "FINISHED_COMPLETED",
    "NODE_AUTH_REFUSED_EXIT",
    "TASK_POLL_INTERVAL",
    "APP_DIR",
    "DEPLOY_DIR",
    "LocalRun",
    "deployment_config",
    "prepare_sites",
    "prepare_heldout_site",
    "start_sites",
    "run_local",
    "default_workdir",
    "written_since",
]

log = logging.getLogger(__name__)

#: Flower's executables live next to this interpreter (the project's virtual environment).
BIN = Path(sys.executable).parent
FINISHED_COMPLETED = "finished:completed"
#: ``flower-supernode``'s exit status when the SuperLink refuses its authentication key.
NODE_AUTH_REFUSED_EXIT = 305
#: Seconds between a SuperExec's looks for new app tasks (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``).
TASK_POLL_INTERVAL = "0.2"


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def flower_env(home: str | Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process on these offline machines.

    ``FLWR_HOME`` is ``home`` (connections, installed apps and logs stay in the deployment's
    folder), telemetry and update checks are off, and runtime dependency installation is
    disabled (otherwise the SuperLink runs ``uv sync`` on the app's dependencies, which fails
    offline and would fetch a CUDA torch). The virtual environment's ``bin`` comes first on
    ``PATH`` so that Flower finds ``flwr-serverapp`` / ``flwr-clientapp``. The SuperExec that
    the SuperLink and each SuperNode run looks for new ServerApp/ClientApp tasks every
    :data:`TASK_POLL_INTERVAL` seconds (``FLWR_SUPEREXEC_TASK_POLL_INTERVAL``, Flower's default
    1 s) unless the environment sets it: every message to a SuperNode starts a ClientApp.
    """
    env = dict(os.environ)
    poll = os.environ.get("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", TASK_POLL_INTERVAL)
    env.update(
        {
            "FLWR_HOME": str(Path(home).resolve()),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            # one torch thread per process: several ClientApp processes share the cores
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
            "FLWR_SUPEREXEC_TASK_POLL_INTERVAL": poll,
        }
    )
    env.update(extra or {})
    return env


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Ask Linux to send SIGTERM to this child when the process that started it dies."""
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        except OSError:
            pass


def _proc_table() -> dict[int, tuple[int, int]]:
    """``pid -> (parent pid, start time)`` of every process (Linux ``/proc``; empty elsewhere)."""
    table: dict[int, tuple[int, int]] = {}
    proc = Path("/proc")
    if not proc.is_dir():
        return table
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # after the command: state, ppid, pgrp, session, ..., starttime is the 20th
        table[int(entry.name)] = (int(fields[1]), int(fields[19]))
    return table


def _descendants(pid: int) -> list[tuple[int, int]]:
    """``(pid, start time)`` of every living descendant of ``pid``, wherever its session.

    Flower's SuperLink starts its ``flower-superexec`` (which starts ``flwr-serverapp``) in a new
    session, out of reach of a signal to the SuperLink's process group.
    """
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for child, (parent, _) in table.items():
        children.setdefault(parent, []).append(child)
    found, todo = [], list(children.get(pid, []))
    while todo:
        child = todo.pop()
        found.append((child, table[child][1]))
        todo.extend(children.get(child, []))
    return found


def _signal_if_same(pid: int, started: int, sig: int) -> None:
    """Signal ``pid`` only if it is still the process that had this start time (no reused ids)."""
    current = _proc_table().get(pid)
    if current is None or current[1] != started:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


class ManagedProcess:
    """A Flower process in its own process group, with its output in a log file.

    Args:
        name: a label for messages (``superlink``, ``site-0000``).
        cmd: the command line.
        env: its environment.
        log_path: where stdout and stderr go.
        cwd: its working directory.
    """

    def __init__(self, name: str, cmd: Sequence[str], *, env: Mapping[str, str], log_path: Path, cwd: Path) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as fh:
            fh.write(f"$ {' '.join(self.cmd)}\n".encode())
            fh.flush()
            self.popen = subprocess.Popen(
                self.cmd, env=dict(env), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, preexec_fn=_die_with_parent,
            )
        self.pid = self.popen.pid
        self.started = time.monotonic()
        self._group_cleared = False
        self._tree: list[tuple[int, int]] = []
        log.debug("started %s (pid %d): %s", name, self.pid, " ".join(self.cmd))

    @property
    def alive(self) -> bool:
        """True while the process runs."""
        return self.popen.poll() is None

    @property
    def returncode(self) -> int | None:
        """Its exit status once it ended."""
        return self.popen.poll()

    def tail(self, chars: int = 3000) -> str:
        """The end of its log."""
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return text[-chars:]

    def _signal_group(self, sig: int) -> None:
        if self._group_cleared:
            return  # never signal a process group id that may have been reused since
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM to the group and every descendant, SIGKILL after ``timeout`` seconds.

        Returns:
            The exit status.
        """
        self.terminate()
        return self.wait_or_kill(timeout)

    def terminate(self) -> None:
        """SIGTERM to the group and every descendant (remembered for :meth:`wait_or_kill`)."""
        if not self.alive:
            return
        self._tree = _descendants(self.pid)
        self._signal_group(signal.SIGTERM)
        for pid, started in self._tree:
            _signal_if_same(pid, started, signal.SIGTERM)

    def wait_or_kill(self, timeout: float) -> int | None:
        """Wait up to ``timeout`` seconds for the process to end, then SIGKILL whatever is left."""
        try:
            self.popen.wait(timeout=max(0.0, timeout))
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %gs; killing it", self.name, timeout)
        self._finish(self._tree)
        return self.popen.poll()

    def kill(self) -> None:
        """SIGKILL to the group and every descendant at once: a crash, no chance to say goodbye."""
        tree = _descendants(self.pid) if self.alive else []
        self._signal_group(signal.SIGKILL)
        self._finish(tree)

    def _finish(self, tree: list[tuple[int, int]]) -> None:
        # children (flwr-clientapp, flwr-serverapp, flower-superexec) may outlive the leader,
        # and may have started children of their own meanwhile
        self._signal_group(signal.SIGKILL)
        tree = tree + [d for pid, _ in tree for d in _descendants(pid)]
        for pid, started in tree:
            _signal_if_same(pid, started, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.popen.wait(timeout=10)
        self._group_cleared = self.popen.poll() is not None


@dataclass
class _Node:
    process: ManagedProcess
    node_config: dict[str, Any]
    key: Path | None
    port: int


class LocalDeployment:
    """A SuperLink and its SuperNodes on 127.0.0.1, and a ``flwr`` connection to them.

    Use as a context manager (or call :meth:`close`): every process it started is stopped on
    exit, whatever happened.

    Args:
        workdir: the deployment's folder (``logs/``, ``homes/``, run-config files).
        app_dir: the Flower app ``flwr run`` submits (a folder with ``pyproject.toml``).
        tls: certificates for TLS; ``None`` runs insecure (plain HTTP), which the caller must
            have asked for explicitly.
        node_auth: enable SuperNode authentication (only registered keys may join); needs TLS.
        connection: the connection name written into the CLI's ``FLWR_HOME/config.toml``.
        host: the address everything binds to.

    Raises:
        DeploymentError: if ``node_auth`` is requested without TLS.
    """

    def __init__(
        self,
        workdir: str | Path,
        *,
        app_dir: str | Path,
        tls: TlsFiles | None = None,
        node_auth: bool = False,
        connection: str = "fedmeta-deploy",
        host: str = "127.0.0.1",
    ) -> None:
        if node_auth and tls is None:
            raise DeploymentError(
                "SuperNode authentication needs TLS (give certificates or turn node authentication off)"
            )
        self.workdir = Path(workdir).resolve()
        self.app_dir = Path(app_dir).resolve()
        self.tls = (
            None
            if tls is None
            else TlsFiles(*(Path(f).resolve() for f in (tls.ca_cert, tls.ca_key, tls.server_cert, tls.server_key)))
        )
        self.node_auth = node_auth
        self.connection = connection
        self.host = host
        self.logs = self.workdir / "logs"
        self.homes = self.workdir / "homes"
        self.cli_home = self.homes / "cli"
        self.port: int | None = None
        self.superlink: ManagedProcess | None = None
        self.nodes: dict[str, _Node] = {}
        self._retired: list[ManagedProcess] = []
        self._runs = 0
        self._out_dirs: dict[int, Path] = {}  # run id -> the out-dir of its run config
        self._closed = False
        self.logs.mkdir(parents=True, exist_ok=True)
        atexit.register(self.close)

    # -- context manager -------------------------------------------------------------------

    def __enter__(self) -> LocalDeployment:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def address(self) -> str:
        """``host:port`` of the SuperLink (one HTTP port for the Fleet, Control and Runtime APIs)."""
        if self.port is None:
            raise DeploymentError("the SuperLink has not been started")
        return f"{self.host}:{self.port}"

    # -- the flwr CLI ----------------------------------------------------------------------

    def flwr(self, args: Sequence[str], *, timeout: float = 120.0, check: bool = True) -> dict[str, Any]:
        """Run ``flwr ARGS --format json`` against this deployment and return its JSON answer.

        Raises:
            DeploymentError: if it times out, prints no JSON, or (``check``) reports no success.
        """
        cmd = [str(BIN / "flwr"), *args, "--format", "json"]
        try:
            proc = subprocess.run(
                cmd, capture_output=True, text=True, env=flower_env(self.cli_home), cwd=self.app_dir,
                timeout=timeout, stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise DeploymentError(f"`flwr {' '.join(args)}` did not answer within {timeout:g}s") from exc
        start = proc.stdout.find("{")
        answer: dict[str, Any] = {}
        if start >= 0:
            with contextlib.suppress(json.JSONDecodeError):
                answer = json.loads(proc.stdout[start:])
        if check and not answer.get("success"):
            detail = answer.get("error-message") or (proc.stderr or proc.stdout).strip()[-1500:]
            raise DeploymentError(f"`flwr {' '.join(args)}` failed (exit {proc.returncode}): {detail}")
        answer.setdefault("exit-code", proc.returncode)
        return answer

    # -- SuperLink -------------------------------------------------------------------------

    def start_superlink(
        self, *, database: str | Path | None = None, port: int | None = None, timeout: float = 90.0
    ) -> ManagedProcess:
        """Start the SuperLink and wait until its Control API answers over the connection.

        Args:
            database: SQLite file for the SuperLink's state (registered node keys and runs
                survive a restart); ``None`` keeps state in memory.
            port: the port (default: a free one, retried up to three times if taken).
            timeout: seconds to wait for it to answer.

        Returns:
            The SuperLink process.

        Raises:
            DeploymentError: if it exits or does not answer within ``timeout``.
        """
        if self.superlink is not None and self.superlink.alive:
            raise DeploymentError("the SuperLink is already running")
        attempts = 1 if port is not None else 3
        last = ""
        for _ in range(attempts):
            self.port = port if port is not None else free_port(self.host)
            cmd = [str(BIN / "flower-superlink"), "--host", self.host, "--port", str(self.port)]
            if self.tls is None:
                cmd.append("--insecure")
            else:
                cmd += [
                    "--ssl-ca-certfile",
                    str(self.tls.ca_cert),
                    "--ssl-certfile",
                    str(self.tls.server_cert),
                    "--ssl-keyfile",
                    str(self.tls.server_key),
                ]
            if self.node_auth:
                cmd.append("--enable-supernode-auth")
            if database is not None:
                cmd += ["--database", str(Path(database).resolve())]
            cmd.append("--disable-runtime-dependency-installation")
            self._write_connection()
            self.superlink = ManagedProcess(
                "superlink",
                cmd,
                env=flower_env(self.homes / "superlink"),
                log_path=self.logs / "superlink.log",
                cwd=self.workdir,
            )
            try:
                self._wait(lambda: self._answers(), timeout, "the SuperLink to answer", [self.superlink])
                log.info("SuperLink up on %s (%s)", self.address, "TLS" if self.tls else "insecure")
                return self.superlink
            except DeploymentError as exc:
                last = str(exc)
                self.superlink.stop()
                if "address already in use" not in self.superlink.tail().lower():
                    break
        raise DeploymentError(last)

    def _write_connection(self) -> None:
        from fedmeta.flower.env import write_superlink_connection

        write_superlink_connection(
            self.connection,
            self.address,
            home=self.cli_home,
            insecure=True if self.tls is None else None,
            root_certificates=str(self.tls.ca_cert) if self.tls is not None else None,
        )

    def _answers(self) -> bool:
        try:
            self.flwr(["ls", self.connection], timeout=30)
            return True
        except DeploymentError:
            return False

    def stop_superlink(self, *, kill: bool = False) -> None:
        """Stop the SuperLink and the ServerApp processes it runs (``kill``: SIGKILL at once)."""
        if self.superlink is None:
            return
        if kill:
            self.superlink.kill()
        else:
            self.superlink.stop()
        self._retired.append(self.superlink)
        self.superlink = None

    # -- SuperNodes ------------------------------------------------------------------------

    def register_node(self, public_key: str | Path, *, name: str | None = None) -> int:
        """Register a SuperNode's public key with the SuperLink (``flwr supernode register``).

        Returns:
            The node id the SuperLink assigned to that key.
        """
        args = ["supernode", "register", str(Path(public_key).resolve()), self.connection]
        if name:
            args += ["--name", name]
        answer = self.flwr(args, timeout=60)
        return int(answer["node-id"])

    def start_supernode(
        self,
        name: str,
        *,
        node_config: Mapping[str, Any] | None = None,
        key: str | Path | None = None,
    ) -> ManagedProcess:
        """Start a SuperNode that connects to the SuperLink.

        Args:
            name: its label (also the name of its log and of its ``FLWR_HOME``).
            node_config: its node config (``data-dir``, ``client-id``), written to a TOML file.
            key: its private authentication key (OpenSSH, ECDSA P-384), for node authentication.

        Returns:
            The SuperNode process (it keeps retrying the SuperLink until it is stopped).
        """
        if name in self.nodes and self.nodes[name].process.alive:
            raise DeploymentError(f"SuperNode '{name}' is already running")
        config = dict(node_config or {})
        config_file = self.workdir / "node-configs" / f"{name}.toml"
        config_file.parent.mkdir(parents=True, exist_ok=True)
        import tomli_w

        config_file.write_text(tomli_w.dumps(config), encoding="utf-8")
        port = free_port(self.host)
        cmd = [str(BIN / "flower-supernode"), "--superlink", self.address, "--host", self.host, "--port", str(port)]
        if self.tls is None:
            cmd.append("--insecure")
        else:
            cmd += ["--root-certificates", str(self.tls.ca_cert)]
        if key is not None:
            cmd += ["--auth-supernode-private-key", str(Path(key).resolve())]
        if config:
            cmd += ["--node-config", str(config_file)]
        process = ManagedProcess(
            name, cmd, env=flower_env(self.homes / name), log_path=self.logs / f"{name}.log", cwd=self.workdir
        )
        old = self.nodes.get(name)
        if old is not None:
            self._retired.append(old.process)
        self.nodes[name] = _Node(process, config, Path(key) if key else None, port)
        return process

    def node_statuses(self) -> dict[int, str]:
        """``node id -> status`` (``online``, ``offline``, ``registered``) as the SuperLink sees it."""
        answer = self.flwr(["supernode", "ls", self.connection], timeout=60)
        return {int(n["node-id"]): str(n["status"]) for n in answer.get("nodes", [])}

    def wait_nodes_online(self, count: int, *, timeout: float = 120.0) -> dict[int, str]:
        """Wait until at least ``count`` SuperNodes are online.

        Raises:
            DeploymentError: if the SuperLink or every SuperNode dies, or on timeout.
        """
        seen: dict[int, str] = {}

        def ready() -> bool:
            nonlocal seen
            seen = self.node_statuses()
            return sum(s == "online" for s in seen.values()) >= count

        self._wait(ready, timeout, f"{count} SuperNodes to come online", self._core_processes(), interval=1.0)
        return seen

    def stop_supernode(self, name: str, *, kill: bool = False) -> None:
        """Stop a SuperNode (``kill``: SIGKILL to it and its ClientApp processes, a crash)."""
        node = self.nodes[name]
        if kill:
            node.process.kill()
        else:
            node.process.stop()

    def restart_supernode(self, name: str, *, node_id: int | None = None, timeout: float = 150.0) -> ManagedProcess:
        """Start a stopped SuperNode again with the same node config and key, and wait until it is online.

        After a crash the SuperLink still counts the node as online until its heartbeats
        lapse (Flower: two 30 s intervals), and refuses to activate it again before that
        (``flower-supernode`` exits with code 305). With the node's id this waits for the
        SuperLink to mark it offline first; without it, a refused start is retried.

        Raises:
            DeploymentError: if the node is not back online within ``timeout`` seconds.
        """
        node = self.nodes[name]
        if node.process.alive:
            raise DeploymentError(f"SuperNode '{name}' is still running")
        deadline = time.monotonic() + timeout
        if node_id is not None:
            self._wait(
                lambda: self.node_statuses().get(node_id) != "online",
                timeout, f"the SuperLink to mark node {node_id} offline", self._core_processes(), interval=1.0,
            )
        while True:
            process = self.start_supernode(name, node_config=node.node_config, key=node.key)
            while process.alive and time.monotonic() < deadline:
                if node_id is not None and self.node_statuses().get(node_id) == "online":
                    return process
                if node_id is None and time.monotonic() - process.started > 20:
                    return process
                time.sleep(1.0)
            if process.alive or time.monotonic() >= deadline:
                raise DeploymentError(
                    f"SuperNode '{name}' did not come back online within {timeout:g}s; its log ends "
                    f"with:\n{process.tail()}"
                )
            log.info(
                "SuperNode %s was refused (exit %s), probably still counted online; retrying", name, process.returncode
            )
            time.sleep(3.0)

    # -- runs ------------------------------------------------------------------------------

    def submit(self, run_config: Mapping[str, Any], *, timeout: float = 180.0) -> int:
        """``flwr run APP_DIR CONNECTION --run-config FILE``: submit a run and return its id.

        The run config goes through a TOML file, so values of any length and content survive.
        A resumed run (``resume`` true) first ends any earlier run of this deployment into the
        same ``out-dir`` that the SuperLink still lists as unfinished
        (:meth:`stop_runs_writing_to`).

        Raises:
            DeploymentError: if ``flwr run`` fails or returns no run id, or an earlier run into
                the same ``out-dir`` cannot be stopped.
        """
        import tomli_w

        out_dir = run_config.get("out-dir")
        if run_config.get("resume") and out_dir:
            self.stop_runs_writing_to(out_dir)
        self._runs += 1
        path = self.workdir / f"run-config-{self._runs}.toml"
        path.write_text(tomli_w.dumps(dict(run_config)), encoding="utf-8")
        answer = self.flwr(["run", str(self.app_dir), self.connection, "--run-config", str(path)], timeout=timeout)
        run_id = answer.get("run-id")
        if run_id is None:
            raise DeploymentError(f"`flwr run` did not return a run id: {answer}")
        log.info("submitted run %s", run_id)
        if out_dir:
            self._out_dirs[int(run_id)] = Path(out_dir).resolve()
        return int(run_id)

    def run_status(self, run_id: int) -> str:
        """The run's status as the SuperLink reports it (``running``, ``finished:completed``, ...)."""
        answer = self.flwr(["ls", self.connection, "--run-id", str(run_id)], timeout=60)
        runs = answer.get("runs") or []
        return str(runs[0]["status"]) if runs else "unknown"

    def wait_run(
        self,
        run_id: int,
        *,
        timeout: float,
        interval: float = 2.0,
        on_poll: Callable[[], None] | None = None,
        ending: Callable[[], bool] | None = None,
        idle_interval: float = 10.0,
    ) -> str:
        """Wait until the run finishes and return its final status.

        Each status check is a ``flwr ls`` process (about a CPU second); with ``ending``, a cheap
        sign that the run is about to finish (e.g. its ServerApp wrote the summary), the status
        is checked only every ``idle_interval`` seconds until that sign appears (to notice a
        failed run), then every ``interval``.

        Args:
            run_id: the run.
            timeout: seconds before giving up.
            interval: seconds between status checks (and between ``on_poll`` calls).
            on_poll: called between checks (e.g. to report progress).
            ending: ``True`` once the run is about to finish; ``None`` checks every ``interval``.
            idle_interval: seconds between status checks while ``ending`` is false.

        Raises:
            DeploymentError: if the SuperLink dies or the run does not finish in time.
        """
        status = ""
        checked = -math.inf

        def done() -> bool:
            nonlocal status, checked
            if on_poll is not None:
                on_poll()
            now = time.monotonic()
            if ending is not None and not ending() and now - checked < idle_interval:
                return False
            checked = now
            status = self.run_status(run_id)
            return status.startswith("finished")

        self._wait(
            done,
            timeout,
            f"run {run_id} to finish (last status: {{status}})",
            [p for p in [self.superlink] if p],
            interval=interval,
            status=lambda: status,
        )
        return status

    def run_statuses(self) -> dict[int, str]:
        """``run id -> status`` of every run the SuperLink lists (``flwr ls``)."""
        answer = self.flwr(["ls", self.connection], timeout=60)
        return {int(r["run-id"]): str(r["status"]) for r in answer.get("runs") or []}

    def stop_run(self, run_id: int) -> dict[str, Any]:
        """``flwr stop RUN_ID``; returns its JSON answer (``success``, ``error-message``)."""
        return self.flwr(["stop", str(run_id), self.connection], timeout=60, check=False)

    def stop_runs_writing_to(self, out_dir: str | Path, *, timeout: float = 60.0) -> list[int]:
        """Stop every unfinished run this deployment submitted into ``out_dir``, and wait until it is finished.

        A run whose ServerApp died with the SuperLink (a crash, SIGKILL) stays ``running`` in
        a SuperLink state kept in a database until the SuperLink notices that its heartbeats
        stopped (Flower: up to 2 x 30 s after the last one; it then shows
        ``finished:failed``). A run whose ServerApp still lives would go on writing into
        ``out_dir``. Before a resumed run takes over that folder, neither may be left running:
        each is stopped with ``flwr stop`` (it then shows ``finished:stopped``) and logged.

        Args:
            out_dir: the run config's ``out-dir``.
            timeout: seconds to wait for a stopped run to be listed as finished.

        Returns:
            The ids of the runs it stopped (runs the SuperLink no longer lists are skipped).

        Raises:
            DeploymentError: if a stopped run is not listed as finished within ``timeout``.
        """
        target = Path(out_dir).resolve()
        mine = [run_id for run_id, path in self._out_dirs.items() if path == target]
        if not mine:
            return []
        statuses = self.run_statuses()
        stopped = []
        for run_id in mine:
            status = statuses.get(run_id)
            if status is None or status.startswith("finished"):
                continue
            log.warning("run %d into %s is still '%s': stopping it before the resumed run", run_id, target, status)
            answer = self.stop_run(run_id)
            said = "accepted" if answer.get("success") else f"refused: {answer.get('error-message') or answer}"
            said = said.replace("{", "{{").replace("}", "}}")  # `_wait` formats the text
            self._wait(
                functools.partial(self._finished, run_id),
                timeout,
                f"run {run_id} to finish after `flwr stop` ({said})",
                self._core_processes(),
                interval=1.0,
            )
            stopped.append(run_id)
        return stopped

    def _finished(self, run_id: int) -> bool:
        return self.run_status(run_id).startswith("finished")

    def run_logs(self, run_id: int, *, timeout: float = 30.0) -> str:
        """The ServerApp's logs of a run as the SuperLink kept them (``flwr log --show``)."""
        cmd = [str(BIN / "flwr"), "log", str(run_id), self.connection, "--show"]
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=flower_env(self.cli_home),
                cwd=self.app_dir,
                timeout=timeout,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired:
            return ""
        return proc.stdout

    # -- health and teardown ---------------------------------------------------------------

    def health(self, *, ask_superlink: bool = True) -> dict[str, Any]:
        """Which processes are alive and (``ask_superlink``) how many nodes the SuperLink sees online."""
        out: dict[str, Any] = {
            "superlink": bool(self.superlink and self.superlink.alive),
            "supernodes": {name: node.process.alive for name, node in self.nodes.items()},
        }
        if out["superlink"] and ask_superlink:
            with contextlib.suppress(DeploymentError):
                out["nodes_online"] = sum(s == "online" for s in self.node_statuses().values())
        return out

    def _core_processes(self) -> list[ManagedProcess]:
        return [p for p in [self.superlink] if p is not None]

    def _wait(
        self,
        ready: Callable[[], bool],
        timeout: float,
        what: str,
        watch: Sequence[ManagedProcess],
        *,
        interval: float = 0.5,
        status: Callable[[], str] | None = None,
    ) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for proc in watch:
                if not proc.alive:
                    raise DeploymentError(
                        f"{proc.name} exited with status {proc.returncode} while waiting for {what.format(status='')}; "
                        f"its log ({proc.log_path}) ends with:\n{proc.tail()}"
                    )
            if ready():
                return
            if time.monotonic() > deadline:
                text = what.format(status=status() if status else "")
                tails = "\n".join(f"--- {p.name} ({p.log_path}):\n{p.tail(1500)}" for p in watch)
                raise DeploymentError(f"timed out after {timeout:g}s waiting for {text}\n{tails}")
            time.sleep(interval)

    def close(self, timeout: float = 15.0) -> None:
        """Stop every process this deployment started: SIGTERM to all, then SIGKILL after ``timeout``.

        SuperNodes first (they say goodbye to the SuperLink), then the SuperLink with its
        ServerApp processes. Ctrl-C and SIGTERM are held back while this runs (main thread), so
        a second Ctrl-C cannot leave processes behind. Idempotent.
        """
        if self._closed:
            return
        blocked = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
        mask = threading.current_thread() is threading.main_thread() and hasattr(signal, "pthread_sigmask")
        previous = signal.pthread_sigmask(signal.SIG_BLOCK, blocked) if mask else None
        try:
            nodes = [node.process for node in self.nodes.values()] + self._retired
            for proc in nodes:
                proc.terminate()
            deadline = time.monotonic() + timeout
            for proc in nodes:
                proc.wait_or_kill(deadline - time.monotonic())
            if self.superlink is not None:
                self.superlink.stop(timeout=timeout)
            self._closed = True
        finally:
            if previous is not None:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        with contextlib.suppress(Exception):
            atexit.unregister(self.close)
        log.debug("deployment in %s stopped", self.workdir)


@contextlib.contextmanager
def terminate_on_signals(signals: Sequence[int] = (signal.SIGTERM, signal.SIGHUP)) -> Iterator[None]:
    """Turn SIGTERM/SIGHUP into ``KeyboardInterrupt`` inside the block, so ``finally`` clauses
    (and :meth:`LocalDeployment.close`) run as they do for Ctrl-C. Main thread only."""
    previous: dict[int, Any] = {}

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in signals:
        previous[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def default_workdir(prefix: str = "fedmeta-deploy-") -> Path:
    """A fresh temporary folder for a deployment whose files need not be kept."""
    return Path(tempfile.mkdtemp(prefix=prefix))


# =============================================================================================
# A whole local deployment of a config (``fedmeta deploy-local``)


#: The Flower app (``pyproject.toml`` with ``[tool.flwr.app]``): the repository root.
APP_DIR = Path(__file__).resolve().parents[3]
#: Sub-folder of the output directory with the deployment's own files (logs, keys, homes).
DEPLOY_DIR = "deploy"


def deployment_config(cfg: Config, num_sites: int, *, heldout_dir: str | Path | None = None) -> Config:
    """The config a deployment of ``num_sites`` on-disk sites runs with.

    Each site is one client (``federation.clients_total = num_sites``, at most that many per
    round; ``federation.min_replies`` capped accordingly) reading its own folder
    (``task.name: folder``). The server holds no site data (``task.data_dir`` null) and builds
    its model from the sites' start-up answers. Without DP it evaluates through the sites'
    ``heldout/`` tasks (``eval.server`` false, ``eval.clients`` = all sites unless the config
    asks for fewer). Under DP federated evaluation is refused (its metrics are un-noised), so the
    server evaluates on held-out sites that no client reads (``eval.data_dir``: ``heldout_dir``,
    else the config's own).

    Args:
        cfg: the config.
        num_sites: the number of sites (clients).
        heldout_dir: under DP, the server's held-out site folder (see :func:`prepare_heldout_site`).

    Raises:
        ConfigError: if the result is not a valid config, or under DP without held-out sites
            for the server (naming ``eval.data_dir``).
    """
    from dataclasses import replace

    from fedmeta.config import config_from_dict, to_dict
    from fedmeta.privacy.mechanisms import mechanism_for

    if num_sites < 1:
        raise ConfigError(f"--sites must be at least 1, got {num_sites}")
    f = cfg.federation
    per_round = min(f.clients_per_round, num_sites)
    min_replies = None if f.min_replies is None else min(f.min_replies, per_round)
    if mechanism_for(cfg).evaluates_on_site_data:
        eval_clients = num_sites if cfg.eval.clients <= 0 else min(cfg.eval.clients, num_sites)
        evaluation = replace(cfg.eval, server=False, clients=eval_clients)
    else:
        held = str(heldout_dir) if heldout_dir is not None else cfg.eval.data_dir
        if not held:
            raise ConfigError(
                f"config key 'eval.data_dir' must name held-out site folders that no client reads: under privacy.mode "
                f"'{cfg.privacy.mode}' a deployment does not turn on federated evaluation (eval.clients; its metrics "
                "are sent without noise), so the server evaluates on held-out tasks of its own"
            )
        evaluation = replace(cfg.eval, server=True, clients=0, data_dir=held)
    out = replace(
        cfg,
        task=replace(cfg.task, name="folder", data_dir=None),
        federation=replace(f, clients_total=num_sites, clients_per_round=per_round, min_replies=min_replies),
        eval=evaluation,
    )
    return config_from_dict(to_dict(out), source="the deployment config")


def prepare_heldout_site(cfg: Config, num_sites: int, out: Path) -> Path:
    """A held-out site for the server of a DP deployment: written like site ``num_sites``, read by no client.

    Its tasks are a function of ``(seed, num_sites)``, so they differ from every client's site
    (sites ``0 .. num_sites-1``) and a resumed run rewrites the same folder.

    Raises:
        ConfigError: for a family ``make-data`` cannot write past the clients' partitions (``folder``,
            ``glyphs``): name held-out sites with ``eval.data_dir`` instead.
    """
    from fedmeta.datagen import make_sites

    if cfg.task.name in ("folder", "glyphs"):
        raise ConfigError(
            f"config key 'eval.data_dir' must name held-out site folders for a DP deployment of task.name "
            f"'{cfg.task.name}' (the server evaluates on tasks no client holds)"
        )
    return make_sites(cfg, 1, out, first=num_sites)[0].resolve()


def prepare_sites(cfg: Config, num_sites: int | None, out: Path, *, data: str | Path | None = None) -> list[Path]:
    """The site folders of a local deployment.

    ``data`` names existing sites (a site folder or a folder of ``site-*`` folders; the first
    ``num_sites`` are used). Otherwise ``fedmeta make-data`` writes ``num_sites`` sites for the
    config's task family into ``out`` (kept as they are when ``out`` already holds that many:
    they are a function of the seed, so a resumed run reuses them).

    Raises:
        ConfigError: if neither data nor a generated family is available or counts disagree.
        DataFormatError: if ``data`` is not in the documented format.
    """
    from fedmeta.tasks.class_folders import is_class_tree
    from fedmeta.tasks.folder import list_sites

    # a class-folder tree is a dataset make-data writes sites from, not a folder of sites
    if data is None and cfg.task.name == "folder" and not (cfg.task.data_dir and is_class_tree(cfg.task.data_dir)):
        if not cfg.task.data_dir:
            raise ConfigError("config key 'task.name' is 'folder': give the sites with --data DIR (or task.data_dir)")
        data = cfg.task.data_dir
    if data is not None:
        sites = list_sites(data)
        if num_sites is not None:
            if num_sites > len(sites):
                raise ConfigError(f"--sites {num_sites} but '{data}' holds only {len(sites)} site folders")
            sites = sites[:num_sites]
        return [p.resolve() for p in sites]
    if num_sites is None:
        raise ConfigError("--sites N is required unless --data names existing site folders")
    existing = sorted(out.glob("site-*")) if out.is_dir() else []
    if len(existing) == num_sites and all((p / "tasks").is_dir() for p in existing):
        log.info("reusing the %d site folders in %s", num_sites, out)
        return [p.resolve() for p in existing]
    from fedmeta.datagen import make_sites

    return [p.resolve() for p in make_sites(cfg, num_sites, out)]


@dataclass
class LocalRun:
    """What :func:`run_local` did: the summary, the run id and the deployment's timings."""

    summary: dict[str, Any]
    run_id: int
    status: str
    startup_seconds: float
    run_seconds: float


def start_sites(
    deployment: LocalDeployment,
    sites: Sequence[Path],
    *,
    keys_dir: Path | None = None,
    privacy_dir: Path | None = None,
    timeout: float = 180.0,
) -> dict[str, int | None]:
    """Start one SuperNode per site folder and wait until all are online.

    Site ``i`` runs as client ``i`` with ``data-dir`` = its folder (and, with ``privacy_dir``,
    ``privacy-state-dir`` = ``privacy_dir/site-i``: where a site keeps its own privacy accountant
    across runs under client-local or task-level DP). With node authentication, each site gets
    an ECDSA P-384 key in ``keys_dir`` (created if missing) whose public half is registered with
    the SuperLink before the node starts.

    Returns:
        ``site name -> node id`` (``None`` without node authentication: ids are assigned on connect).
    """
    from fedmeta.flower.deploy.certs import make_node_key

    ids: dict[str, int | None] = {}
    for i, site in enumerate(sites):
        name = f"site-{i:04d}"
        key_path: Path | None = None
        if deployment.node_auth:
            if keys_dir is None:
                raise DeploymentError("node authentication needs a folder for the node keys")
            key_path = keys_dir / name
            if not (key_path.is_file() and key_path.with_name(name + ".pub").is_file()):
                make_node_key(key_path, comment=name)
            ids[name] = deployment.register_node(key_path.with_name(name + ".pub"), name=name)
        else:
            ids[name] = None
        node_config: dict[str, Any] = {"data-dir": str(site), "client-id": i}
        if privacy_dir is not None:
            node_config["privacy-state-dir"] = str((privacy_dir / name).resolve())
        deployment.start_supernode(name, node_config=node_config, key=key_path)
    deployment.wait_nodes_online(len(sites), timeout=timeout)
    return ids


def written_since(path: Path, since: float) -> bool:
    """True if ``path`` exists and was last written at or after ``since`` (``time.time()`` seconds).

    A ServerApp writes its run's summary last, so a fresh summary means the run is ending.
    """
    try:
        return path.stat().st_mtime >= since
    except OSError:
        return False


def _new_rows(path: Path, seen: int) -> list[dict[str, Any]]:
    from fedmeta.outputs import read_metrics

    try:
        rows = read_metrics(path)
    except (OSError, ValueError):  # a line being written: read it next time
        return []
    return rows[seen:]


def run_local(
    cfg: Config,
    out: str | Path,
    *,
    sites: int | None = None,
    data: str | Path | None = None,
    tls: bool = True,
    node_auth: bool = True,
    resume: bool = False,
    keep_files: bool = False,
    timeout: float | None = None,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
) -> LocalRun:
    """Run ``cfg`` over a real SuperLink and one SuperNode per site on 127.0.0.1.

    Steps: site folders (:func:`prepare_sites`), certificates and node keys (``tls``,
    ``node_auth``), SuperLink, registered SuperNodes, ``flwr run`` with the deployment config
    (:func:`deployment_config`), waiting on ``flwr ls`` for the run's real status, teardown of
    every process whatever happens. The run's outputs (summary.json, metrics.jsonl,
    checkpoint.pt, plots) go to ``out``; the deployment's own files to ``out/deploy`` (removed
    after a successful run unless ``keep_files``; kept after a failure for its logs).

    Args:
        cfg: the config (any task family; the sites are written from it).
        out: the output directory.
        sites: number of sites (default: every site in ``data``).
        data: existing site folders instead of generated ones.
        tls: TLS between every process and the SuperLink (else plain HTTP).
        node_auth: only registered SuperNode keys may join (needs ``tls``).
        resume: continue from ``out/checkpoint.pt`` at the next round.
        keep_files: keep ``out/deploy`` (logs, keys, Flower homes) after success.
        timeout: seconds for the run itself (default: a bound derived from the config's rounds
            and timeouts).
        progress: called with ``(round, metrics row)`` as rounds complete.

    Returns:
        The :class:`LocalRun`.

    Raises:
        ConfigError: for an invalid combination of options.
        CheckpointError: if ``resume`` and there is no usable checkpoint.
        DeploymentError: if a process fails, the run fails, or a wait times out (the message
            carries the relevant log tail; the logs stay in ``out/deploy/logs``).
    """
    import shutil

    from fedmeta.flower.deploy.certs import make_tls
    from fedmeta.flower.run_config import RunOptions, run_config_for
    from fedmeta.outputs import METRICS, SUMMARY, RunRecorder

    if node_auth and not tls:
        raise ConfigError("SuperNode authentication needs TLS: drop --insecure or add --no-node-auth")
    started = time.perf_counter()
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    if resume:
        from fedmeta.checkpoint import load_checkpoint

        done = int(load_checkpoint(out_dir / "checkpoint.pt")["round"])
        log.info("resuming after round %d", done)
    site_dirs = prepare_sites(cfg, sites, out_dir / "sites", data=data)
    from fedmeta.privacy.mechanisms import mechanism_for

    heldout = None
    if not mechanism_for(cfg).evaluates_on_site_data and not cfg.eval.data_dir and data is None:
        heldout = prepare_heldout_site(cfg, len(site_dirs), out_dir / "server_heldout")
    dcfg = deployment_config(cfg, len(site_dirs), heldout_dir=heldout)
    privacy_dir: Path | None = None

    mechanism = mechanism_for(dcfg)
    if mechanism.enabled:
        from fedmeta.privacy.budget import enforce_budget

        # the ServerApp checks again (a resumed run on top of its checkpoint's history, which only it
        # reads: a fresh plan at new settings would refuse or allow the wrong resumes); this refuses a
        # fresh run before any process starts
        if not resume and (not mechanism.counts_site_pools or dcfg.task.tasks_per_site is not None):
            enforce_budget(dcfg)
        if mechanism.client_keeps_state:
            privacy_dir = out_dir / "site_privacy"  # the sites' own accountants, kept for --resume
            if not resume:
                shutil.rmtree(privacy_dir, ignore_errors=True)
    work = out_dir / DEPLOY_DIR
    if work.exists() and not resume:
        shutil.rmtree(work / "logs", ignore_errors=True)
    tls_files = make_tls(work / "pki") if tls else None
    budget = (
        timeout
        if timeout is not None
        else dcfg.federation.rounds * (dcfg.federation.round_timeout * (1 + dcfg.federation.max_retries) + 60)
        + dcfg.federation.join_timeout
        + 300
    )
    ok = False
    with LocalDeployment(work, app_dir=APP_DIR, tls=tls_files, node_auth=node_auth) as deployment:
        try:
            deployment.start_superlink()
            start_sites(deployment, site_dirs, keys_dir=work / "keys", privacy_dir=privacy_dir)
            startup = time.perf_counter() - started
            submitted = time.time()
            run_id = deployment.submit(run_config_for(dcfg, RunOptions(out_dir=str(out_dir), resume=resume)))
            t_run = time.perf_counter()
            seen = [0]

            def report() -> None:
                new = _new_rows(out_dir / METRICS, seen[0])
                seen[0] += len(new)
                for row in new:
                    if progress is not None and "replies" in row:
                        progress(int(row["round"]), row)

            status = deployment.wait_run(
                run_id, timeout=budget, interval=1.0, on_poll=report,
                ending=functools.partial(written_since, out_dir / SUMMARY, submitted),
            )  # fmt: skip
            report()
            run_seconds = time.perf_counter() - t_run
            if status != FINISHED_COMPLETED or not (out_dir / SUMMARY).is_file():
                logs = deployment.run_logs(run_id)
                raise DeploymentError(
                    f"run {run_id} ended with status '{status}'. The ServerApp's log ends with:\n{logs[-2500:]}\n"
                    f"Process logs: {deployment.logs}"
                )
            ok = True
        finally:
            health = deployment.health(ask_superlink=False)
            deployment.close()
            if not ok:
                log.warning("deployment files kept for inspection in %s (health at teardown: %s)", work, health)
    summary = json.loads((out_dir / SUMMARY).read_text(encoding="utf-8"))
    summary["server_wall_seconds"] = summary.get("wall_seconds")
    summary["wall_seconds"] = time.perf_counter() - started
    summary["mode"] = "deployment"
    summary["deployment"] = {
        "sites": len(site_dirs),
        "tls": tls,
        "node_auth": node_auth,
        "run_id": run_id,
        "startup_seconds": startup,
        "run_seconds": run_seconds,
        "resumed": resume,
    }
    RunRecorder(out_dir, resume_round=summary.get("rounds_completed", 0)).write_summary(summary)
    if not keep_files:
        shutil.rmtree(work, ignore_errors=True)
    return LocalRun(summary, run_id, status, startup, run_seconds)
