"""The centralized reference: the federated meta-learning math in one process, no Flower.

It is the :class:`~fedmeta.federation.loop.RoundLoop` every path runs, over the
:class:`~fedmeta.federation.transport.InProcessTransport`: each round samples the clients and
tasks the federated server would (SPEC §10), computes every client's mean meta-gradient in one
vectorized pass, and aggregates, steps, accounts, evaluates, checkpoints and logs exactly as the
Flower server does — because it is the same code. Under differential privacy the in-process
clients run the same client-side privacy code as Flower clients, with their accountants kept in
the checkpoint; with ``privacy.noise_seed`` fixed it releases the same cohorts, the same noise and
so the same aggregates as ``fedmeta simulate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fedmeta.config import Config
from fedmeta.experiment import Experiment
from fedmeta.federation.loop import ProgressFn, RoundLoop
from fedmeta.federation.transport import InProcessTransport

__all__ = ["run_centralized"]


def run_centralized(
    cfg: Config,
    out_dir: str | Path,
    *,
    resume: bool = False,
    progress: ProgressFn | None = None,
    experiment: Experiment | None = None,
) -> dict[str, Any]:
    """Meta-train in one process and write the SPEC §9 outputs into ``out_dir``.

    Args:
        cfg: the run configuration.
        out_dir: output directory.
        resume: continue from ``out_dir/checkpoint.pt`` at the next round.
        progress: called after every round with the round number and its metrics row.
        experiment: a prebuilt experiment for ``cfg`` (tests reuse one).

    Returns:
        The summary written to ``summary.json``.

    Raises:
        CheckpointError: if ``resume`` is set and the checkpoint is missing or incompatible.
        BudgetExhausted: if the privacy budget refuses the run.
    """
    loop = RoundLoop(cfg, out_dir, mode="centralized", resume=resume, experiment=experiment, server_eval=True)
    return loop.run(InProcessTransport(), progress=progress)
