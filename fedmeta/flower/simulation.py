"""Federated meta-training through Flower's simulation engine (Ray backend): ``fedmeta simulate``.

The same ``ClientApp`` (:mod:`fedmeta.flower.client_app`) and ``ServerApp``
(:mod:`fedmeta.flower.server_app`) that run in a deployment are started by Flower's
``run_simulation`` with one Ray actor per CPU core and, by default (``simulation.pool``), a small
pool of virtual SuperNodes (``simulation.nodes``, default one per actor) that play the logical
clients each round (:mod:`fedmeta.flower.pool`): registered clients cost no node until sampled.
With ``simulation.pool: false``, and always for site folders (a node never plays two sites'
data), there is one virtual SuperNode per registered client (``federation.clients_total``).

Differential privacy (``privacy.mode``) runs inside those apps: the server's
:class:`~fedmeta.privacy.facade.ServerPrivacy` (the default policy of
:class:`~fedmeta.federation.loop.RoundLoop`) and each client's
:class:`~fedmeta.privacy.facade.ClientPrivacy`. The budget is checked here before Ray starts, so
a refused config fails in seconds; the simulated sites keep their accountants in
``OUT/client_privacy/`` so that a resumed run continues them.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fedmeta.config import Config
from fedmeta.errors import ConfigError, FedMetaError
from fedmeta.flower.env import configure_environment

__all__ = ["simulate", "run_flower_simulation", "join_ray_cluster", "quiet_flower_logs", "CLIENT_PRIVACY_DIR"]

#: Sub-folder of a simulation's output where the simulated sites keep their privacy accountants.
CLIENT_PRIVACY_DIR = "client_privacy"

log = logging.getLogger(__name__)


def simulate(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: Callable[[int, dict[str, Any]], None] | None = None,
    client_mods: Sequence[Any] = (),
    cpus_per_client: float = 1.0,
    num_cpus: int | None = None,
    ray_address: str | None = None,
    verbose: bool = False,
    **server_kwargs: Any,
) -> dict[str, Any]:
    """Run ``cfg`` through Flower's simulation engine and return the summary.

    On one machine Ray starts here and stops with the run. With ``ray_address`` the simulation
    joins a running Ray cluster instead (Flower's multi-node route: ``ray start --head`` on one
    machine, ``ray start --address=HEAD:6379`` on the others, the same environment everywhere, the
    simulation started on the head): the ClientApp actors go wherever the cluster has CPUs (a head
    started with ``--num-cpus=0`` only drives), the pool has one node per actor the cluster can
    hold, and the cluster keeps running after the run. Flower's backend accepts only CPUs and GPUs
    as actor resources, so custom Ray resources cannot pin actors.

    Args:
        cfg: the run configuration.
        out_dir: output directory (metrics.jsonl, summary.json, checkpoint.pt, plots).
        resume: continue from ``out_dir/checkpoint.pt`` at the next round.
        progress: called after every round with its metrics row (in this process).
        client_mods: Flower mods wrapped around every ClientApp handler (tests inject faults; a
            mod that acts per client needs ``simulation.pool: false``, one node per client).
        cpus_per_client: Ray CPUs per ClientApp actor.
        num_cpus: CPUs Ray may use (default: all cores; not with ``ray_address``: the cluster has its own).
        ray_address: a running Ray cluster to join (``HOST:PORT``, or ``auto``); ``None``: a local Ray.
        verbose: keep Flower's and Ray's logs.
        **server_kwargs: passed to :func:`fedmeta.flower.server_app.run_server` (policy, transforms,
            the transport's ``deadline``).

    Returns:
        The summary written to ``summary.json``, with ``wall_seconds`` measured around the
        whole simulation (Ray start-up included; the start-up query's share is
        ``federation.discovery_seconds``).

    Raises:
        BudgetExhausted: if the privacy budget refuses the run (before Ray starts).
        ConfigError: for ``num_cpus`` with ``ray_address``, or a cluster that cannot hold one
            ClientApp actor.
        FedMetaError: what the server raised (e.g. ``InconsistentReplies``).
    """
    configure_environment()  # before flwr and ray load (each variable only if not set)
    out = Path(out_dir)
    state_dir: Path | None = None
    from fedmeta.privacy.mechanisms import mechanism_for

    mechanism = mechanism_for(cfg)
    if mechanism.enabled:
        from fedmeta.privacy.budget import enforce_budget

        # the server checks again (a resumed run on top of its checkpoint's history, which only it reads);
        # this refuses a fresh run before Ray's start-up
        if not resume and (not mechanism.counts_site_pools or cfg.task.tasks_per_site is not None):
            enforce_budget(cfg)
        state_dir = out / CLIENT_PRIVACY_DIR
        if not resume and state_dir.is_dir():
            # a fresh simulation has fresh simulated sites: their old accountants do not apply
            shutil.rmtree(state_dir)
    from fedmeta.flower.client_app import build_client_app
    from fedmeta.flower.pool import check_pooling, pool_size
    from fedmeta.flower.server_app import build_server_app

    capacity = None
    if ray_address is not None:
        if num_cpus is not None:
            raise ConfigError("num_cpus cannot be set when joining a Ray cluster (ray_address): it has its own")
        capacity = join_ray_cluster(ray_address, cpus_per_client=cpus_per_client, verbose=verbose)
    pool_nodes = None
    if check_pooling(cfg):
        pool_nodes = pool_size(cfg, num_cpus=num_cpus, cpus_per_client=cpus_per_client)
        if capacity is not None and cfg.simulation.nodes is None:
            pool_nodes = capacity
    started = time.perf_counter()
    server_app = build_server_app(
        cfg, out, resume=resume, mode="simulation", progress=progress, pool_nodes=pool_nodes, **server_kwargs
    )
    client_app = build_client_app(cfg, mods=client_mods, privacy_state_dir=state_dir)
    try:
        run_flower_simulation(
            server_app,
            client_app,
            num_supernodes=pool_nodes if pool_nodes is not None else cfg.federation.clients_total,
            cpus_per_client=cpus_per_client,
            num_cpus=num_cpus,
            verbose=verbose,
        )
    finally:
        if ray_address is not None:
            import ray

            ray.shutdown()  # this driver leaves; the cluster keeps running
    summary_path = out / "summary.json"
    if not summary_path.is_file():
        raise FedMetaError(f"the simulation ended without writing {summary_path}; rerun with --debug for Flower's logs")
    summary: dict[str, Any] = json.loads(summary_path.read_text(encoding="utf-8"))
    summary["wall_seconds"] = time.perf_counter() - started
    from fedmeta.outputs import RunRecorder

    RunRecorder(out, resume_round=summary.get("rounds_completed", 0)).write_summary(summary)
    return summary


def join_ray_cluster(address: str, *, cpus_per_client: float, verbose: bool = False) -> int:
    """Connect this process to the Ray cluster at ``address``; return how many ClientApp actors it can hold.

    Flower's simulation engine starts Ray only when it is not initialized yet, so once connected
    here it runs its actors on this cluster.

    Raises:
        ConfigError: if the cluster has fewer CPUs than one actor needs.
    """
    import ray

    if not ray.is_initialized():
        ray.init(address=address, log_to_driver=verbose)
    cpus = float(ray.cluster_resources().get("CPU", 0.0))
    if cpus < cpus_per_client:
        ray.shutdown()
        raise ConfigError(
            f"the Ray cluster at {address} has {cpus:g} CPUs for tasks; each ClientApp actor needs {cpus_per_client:g}"
        )
    return int(cpus // cpus_per_client)


def quiet_flower_logs(level: int = logging.ERROR) -> None:
    """Set Flower's logger (``flwr``) level and keep it off the root handlers (no duplicates).

    Flower logs per message at INFO and warns on every ``run_simulation`` call that it is
    deprecated; fedmeta reports what matters through its own logger.
    """
    logger = logging.getLogger("flwr")
    logger.setLevel(level)
    logger.propagate = False


def run_flower_simulation(
    server_app: Any,
    client_app: Any,
    *,
    num_supernodes: int,
    cpus_per_client: float = 1.0,
    num_cpus: int | None = None,
    verbose: bool = False,
) -> None:
    """Run a ServerApp and a ClientApp in Flower's simulation engine (Ray backend).

    Args:
        server_app: the ``ServerApp``.
        client_app: the ``ClientApp``.
        num_supernodes: virtual nodes (registered clients).
        cpus_per_client: Ray CPUs per ClientApp actor (1: one actor per core).
        num_cpus: CPUs Ray may use (default: all).
        verbose: keep Flower's INFO logs and Ray's worker output.
    """
    from flwr.simulation import run_simulation

    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose}
    if num_cpus is not None:
        init_args["num_cpus"] = num_cpus
    backend = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }
    if not verbose:
        quiet_flower_logs()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        run_simulation(
            server_app=server_app, client_app=client_app, num_supernodes=num_supernodes, backend_config=backend
        )
