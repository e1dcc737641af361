"""The fedmeta Flower ``ServerApp``.

``app`` is what ``flwr run`` loads (``[tool.flwr.app.components] serverapp``): it reads the
config from ``context.run_config`` (``[tool.flwr.app.config]``: ``config-file`` or
``config-yaml``, ``overrides``, ``out-dir``, ``resume``). :func:`build_server_app` binds a
config, an output directory and options directly; ``fedmeta simulate`` uses it because Flower's
``run_simulation`` leaves ``run_config`` empty.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmeta import flower as fl  # first: sets Flower's environment before flwr is imported
from fedmeta.config import Config
from fedmeta.federated import AggregateTransform, MetaServer, RoundPolicy, UpdateTransform
from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from server.meta_strategy import FedMetaStrategy, ProgressFn

__all__ = ["app", "build_server_app", "run_server"]

log = logging.getLogger(__name__)

APP_DIR = Path(__file__).resolve().parents[1]


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
) -> dict[str, Any]:
    """Run federated meta-training on ``grid`` and write the outputs into ``out_dir``.

    Args:
        grid: Flower's grid (simulation or deployment).
        cfg: the run configuration.
        out_dir: output directory.
        resume: continue from ``out_dir/checkpoint.pt`` at the next round.
        mode: ``summary.json``'s ``mode``.
        policy: cohort/aggregation/accounting policy (default: no privacy).
        update_transforms: post-processing of per-client updates before aggregation.
        aggregate_transforms: post-processing of the aggregate before the optimizer step.
        progress: called after every round.

    Returns:
        The summary.
    """
    server = MetaServer(
        cfg,
        out_dir,
        mode=mode,
        resume=resume,
        policy=policy,
        update_transforms=update_transforms,
        aggregate_transforms=aggregate_transforms,
    )
    return FedMetaStrategy(server, progress=progress).run(grid)


def build_server_app(cfg: Config, out_dir: str | Path, *, resume: bool = False, mode: str = "simulation", **kwargs: Any) -> ServerApp:
    """A ``ServerApp`` bound to ``cfg`` and ``out_dir`` (keyword arguments go to :func:`run_server`)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run_server(grid, cfg, out_dir, resume=resume, mode=mode, **kwargs)

    return server_app


#: The ServerApp ``flwr run`` loads.
app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point under ``flwr run``: config and options from ``context.run_config``."""
    cfg, options = fl.run_settings(context.run_config, app_dir=APP_DIR)
    out = Path(options.out_dir) if options.out_dir else Path.cwd() / "runs" / f"flwr-run-{context.run_id}"
    log.warning("fedmeta ServerApp: writing outputs to %s", out.resolve())
    run_server(grid, cfg, out, resume=options.resume, mode="flwr-run")
