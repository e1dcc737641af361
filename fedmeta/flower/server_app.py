"""The fedmeta Flower ``ServerApp``: :func:`run_server` and the builders of the app.

:func:`build_server_app` binds a config, an output directory and options directly; ``fedmeta
simulate`` uses it because Flower's ``run_simulation`` leaves ``run_config`` empty.
:func:`build_run_config_server_app` builds the app ``flwr run`` loads (``server/app.py``,
``[tool.flwr.app.components] serverapp``): it reads the config from ``context.run_config``
(``[tool.flwr.app.config]``: ``config-file`` or ``config-yaml``, ``overrides``, ``out-dir``,
``resume``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedmeta.config import Config
from fedmeta.experiment import Experiment
from fedmeta.federation import (
    AggregateTransform,
    ClientIdentity,
    ProgressFn,
    RoundLoop,
    RoundPolicy,
    UpdateTransform,
    needs_site_layout,
    site_layout,
)
from fedmeta.flower import records as fl
from fedmeta.flower.run_config import run_settings
from fedmeta.flower.transport import Deadline, FlowerTransport, ask_sites, timeout_deadline

__all__ = ["build_run_config_server_app", "build_server_app", "run_server"]

log = logging.getLogger(__name__)


def run_server(
    grid: Grid,
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    mode: str = "simulation",
    policy: RoundPolicy | None = None,
    update_transforms: Sequence[UpdateTransform] = (),
    aggregate_transforms: Sequence[AggregateTransform] = (),
    progress: ProgressFn | None = None,
    deadline: Deadline = timeout_deadline,
    pool_nodes: int | None = None,
) -> dict[str, Any]:
    """Run federated meta-training on ``grid`` and write the outputs into ``out_dir``.

    A server whose config has on-disk sites but no ``task.data_dir`` (a deployment: every
    SuperNode has its own ``data-dir``) builds its model from the sites' start-up answers
    (:func:`fedmeta.federation.directory.site_layout`) and evaluates through them (``eval.clients``) or, under
    DP, on held-out sites of its own (``eval.data_dir``).

    Args:
        grid: Flower's grid (simulation or deployment).
        cfg: the run configuration.
        out_dir: output directory.
        resume: continue from ``out_dir/checkpoint.pt`` at the next round.
        mode: ``summary.json``'s ``mode``.
        policy: cohort/aggregation/accounting policy (default: the config's, ``ServerPrivacy`` under DP).
        update_transforms: post-processing of per-client updates before aggregation.
        aggregate_transforms: post-processing of the aggregate before the optimizer step.
        progress: called after every round.
        deadline: when an exchange stops waiting for missing replies
            (:data:`fedmeta.flower.transport.Deadline`; default: after its timeout).
        pool_nodes: a pool of that many simulation nodes plays the logical clients
            (:class:`fedmeta.flower.pool.PooledFlowerTransport`; ``None``: one node per client).

    Returns:
        The summary.
    """
    experiment, answers = None, None
    started = time.perf_counter()
    if needs_site_layout(cfg):
        # No site data here: the model's input shape and outputs come from the sites' answers
        # to the start-up query (the architecture from the config); the same answers then
        # register the sites, so they are asked once.
        fl.prepare_grid(grid)
        answers = ask_sites(grid, cfg, deadline=deadline)
        family = site_layout([a for a in answers.values() if isinstance(a, ClientIdentity)])
        log.info(
            "no site data on the server: model built for %s inputs of shape %s with %d outputs, as the sites report",
            family.kind,
            family.input_shape,
            family.output_dim,
        )
        experiment = Experiment(cfg, family=family)
    loop = RoundLoop(
        cfg, out_dir, mode=mode, resume=resume, experiment=experiment, policy=policy,
        update_transforms=update_transforms, aggregate_transforms=aggregate_transforms,
    )  # fmt: skip
    transport: FlowerTransport
    if pool_nodes is not None:
        from fedmeta.flower.pool import PooledFlowerTransport

        transport = PooledFlowerTransport(grid, nodes=pool_nodes, deadline=deadline)
    else:
        transport = FlowerTransport(grid, answers=answers, deadline=deadline)
    if answers is not None:
        transport.timings["discovery_seconds"] = time.perf_counter() - started
    return loop.run(transport, progress=progress)


def build_server_app(
    cfg: Config, out_dir: str | Path, *, resume: bool = False, mode: str = "simulation", **kwargs: Any
) -> ServerApp:
    """A ``ServerApp`` bound to ``cfg`` and ``out_dir`` (keyword arguments go to :func:`run_server`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, out_dir, resume=resume, mode=mode, **kwargs)

    return server_app


def build_run_config_server_app(app_dir: str | Path | None = None) -> ServerApp:
    """The ``ServerApp`` ``flwr run`` loads: config and options from ``context.run_config``.

    Args:
        app_dir: the app directory (repository root or unpacked app bundle): a relative
            ``config-file`` is looked up there first.

    Returns:
        The ``ServerApp``; its outputs go to ``out-dir``, or ``runs/flwr-run-RUN_ID`` under the
        current directory.
    """
    base = Path(app_dir) if app_dir is not None else None
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        """Entry point under ``flwr run``: config and options from ``context.run_config``."""
        cfg, options = run_settings(context.run_config, app_dir=base)
        out = Path(options.out_dir) if options.out_dir else Path.cwd() / "runs" / f"flwr-run-{context.run_id}"
        log.warning("fedmeta ServerApp: writing outputs to %s", out.resolve())
        run_server(grid, cfg, out, resume=options.resume, mode="flwr-run")

    return app
