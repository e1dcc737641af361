"""The centralized reference: the federated meta-learning math in one process, no Flower.

Each round samples the same clients and the same tasks the federated server would (SPEC §10),
computes every client's mean meta-gradient, aggregates them with the same rule and applies the
same server optimizer. ``fedmeta simulate`` is checked against this loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmeta.aggregation import global_norm
from fedmeta.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedmeta.config import Config, to_dict
from fedmeta.errors import CheckpointError
from fedmeta.experiment import Experiment, build_summary
from fedmeta.outputs import EPISODE_PNG, RunRecorder, write_episode_montage

__all__ = ["run_centralized"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, dict[str, Any]], None]


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
    """
    started = time.perf_counter()
    exp = experiment or Experiment(cfg)
    if cfg.privacy.mode != "none":
        log.warning(
            "privacy.mode=%s is a property of the federation; the centralized reference trains without DP",
            cfg.privacy.mode,
        )
    if cfg.meta.algorithm == "metasgd" and cfg.eval.steps > cfg.meta.inner_steps:
        log.warning(
            "Meta-SGD's learned rates are tuned for meta.inner_steps=%d; evaluating %d steps with them "
            "may diverge (set eval.steps=%d to evaluate what was trained)",
            cfg.meta.inner_steps, cfg.eval.steps, cfg.meta.inner_steps,
        )
    meta = exp.initial_meta_params()
    opt = exp.server_optimizer(meta)
    start_round = 1
    out = Path(out_dir)
    if resume:
        state = load_checkpoint(out / "checkpoint.pt")
        check_compatible(state, exp.model.param_shapes, path=out / "checkpoint.pt", task_kind=exp.kind)
        if set(state["meta_params"]) != set(meta):
            raise CheckpointError(f"checkpoint '{out / 'checkpoint.pt'}' was written by a different algorithm")
        meta = state["meta_params"]
        opt = exp.server_optimizer(meta)
        if state.get("optimizer"):
            opt.load_state_dict(state["optimizer"])
        start_round = int(state["round"]) + 1
        log.info("resuming centralized run at round %d", start_round)
    recorder = RunRecorder(out, resume_round=start_round - 1 if resume else None)
    eval_tasks = exp.source.eval_tasks()
    rounds = cfg.federation.rounds
    every = cfg.eval.every

    def checkpoint(round_idx: int) -> None:
        save_checkpoint(
            recorder.checkpoint_path,
            meta_params=meta,
            round_idx=round_idx,
            config=to_dict(cfg),
            model=exp.model.describe(),
            task_kind=exp.kind,
            optimizer=opt.state_dict(),
        )

    final_eval: dict[str, Any] | None = None
    if start_round == 1:
        recorder.log_round({"round": 0, "eval": exp.evaluate(meta, eval_tasks).summary()})
    for r in range(start_round, rounds + 1):
        t0 = time.perf_counter()
        clients = exp.sample_round(r)
        result = exp.round_updates(meta, r, clients)
        update = exp.aggregate(result)
        meta = opt.step(update)
        row: dict[str, Any] = {
            "round": r,
            "clients": len(clients),
            "tasks": int(result.weights.sum()),
            "train": result.metrics,
            "update_norm": global_norm(update),
        }
        last = r == rounds
        if r % every == 0 or last:
            final_eval = row["eval"] = exp.evaluate(meta, eval_tasks).summary()
            checkpoint(r)
        row["seconds"] = time.perf_counter() - t0
        recorder.log_round(row)
        if progress is not None:
            progress(r, row)
    if final_eval is None:  # resumed a run that had already finished
        final_eval = exp.evaluate(meta, eval_tasks).summary()
    curves = {k: v for k, v in final_eval.items() if k.endswith("_curve")}
    recorder.plot(curves)
    if exp.kind == "classification":  # a held-out episode with the adapted model's predictions
        write_episode_montage(exp.algorithm, meta, eval_tasks.slice(0, 1), out / EPISODE_PNG, steps=cfg.eval.steps, caption="held-out ")
    summary = build_summary(
        cfg,
        mode="centralized",
        rounds_completed=rounds,
        final=final_eval,
        privacy=None,
        wall_seconds=time.perf_counter() - started,
    )
    recorder.write_summary(summary)
    return summary
