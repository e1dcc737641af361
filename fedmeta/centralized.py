"""The centralized reference: the federated meta-learning math in one process, no Flower.

Each round samples the same clients and the same tasks the federated server would (SPEC §10),
computes every client's mean meta-gradient, aggregates them with the same rule and applies the
same server optimizer. ``fedmeta simulate`` is checked against this loop.

Under differential privacy it runs the same privacy code as the federation: the server's
:class:`~fedmeta.privacy.facade.ServerPrivacy` (Poisson cohorts under client-central, clipping,
noise, accounting, budget) and, for client-local and task-level DP, every client's
:class:`~fedmeta.privacy.facade.ClientPrivacy` through :mod:`fedmeta.privacy.client_update`, with
the clients' accountants kept in the checkpoint. With ``privacy.noise_seed`` fixed it releases the
same cohorts, the same noise and so the same aggregates as ``fedmeta simulate``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmeta.aggregation import global_norm
from fedmeta.algorithms import MetaUpdate
from fedmeta.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedmeta.config import Config, to_dict
from fedmeta.errors import BudgetExhausted, CheckpointError
from fedmeta.experiment import Experiment, build_summary
from fedmeta.outputs import EPISODE_PNG, RunRecorder, write_episode_montage
from fedmeta.privacy.facade import CLIP_NORM_KEY, ClientPrivacy, ServerPrivacy
from fedmeta.types import Params

__all__ = ["run_centralized", "private_aggregate"]

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
        BudgetExhausted: if the privacy budget refuses the run.
    """
    started = time.perf_counter()
    exp = experiment or Experiment(cfg)
    privacy = ServerPrivacy(cfg) if cfg.privacy.mode != "none" else None
    rounds = privacy.rounds_to_run() if privacy is not None else cfg.federation.rounds
    client_states: dict[int, dict[str, Any]] = {}
    rdp_cache: dict[tuple[float, float], Any] = {}  # the clients' accountants share Opacus' RDP curves
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
        if privacy is not None:
            if not state.get("accountant"):
                raise CheckpointError(f"checkpoint '{out / 'checkpoint.pt'}' holds no privacy state; this run has privacy.mode '{cfg.privacy.mode}'")
            privacy.load_state_dict(state["accountant"])
            saved = (state.get("extra") or {}).get("client_privacy") or {"clients": [], "states": []}
            client_states = {int(c): dict(s) for c, s in zip(saved["clients"], saved["states"])}
        start_round = int(state["round"]) + 1
        log.info("resuming centralized run at round %d", start_round)
    recorder = RunRecorder(out, resume_round=start_round - 1 if resume else None)
    eval_tasks = exp.source.eval_tasks()
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
            accountant=privacy.state_dict() if privacy is not None else None,
            extra={"client_privacy": {"clients": sorted(client_states), "states": [client_states[c] for c in sorted(client_states)]}}
            if client_states
            else None,
        )

    final_eval: dict[str, Any] | None = None
    if start_round == 1:
        recorder.log_round({"round": 0, "eval": exp.evaluate(meta, eval_tasks).summary()})
    for r in range(start_round, rounds + 1):
        t0 = time.perf_counter()
        row: dict[str, Any]
        reports: dict[int, dict[str, float]] = {}
        if privacy is None:
            clients = exp.sample_round(r)
            result = exp.round_updates(meta, r, clients)
            update: Params | None = exp.aggregate(result)
            row = {"round": r, "clients": len(clients), "tasks": int(result.weights.sum()), "train": result.metrics}
        else:
            clients = privacy.sample_clients(r)
            update, reports = private_aggregate(exp, privacy, meta, r, clients, client_states, rdp_cache=rdp_cache)
            # under DP no unprivatized training metrics are released, as in the federation
            row = {"round": r, "clients": len(clients), "replies": len(reports), "train": {}}
        if update is not None:
            meta = opt.step(update)
        row["update_norm"] = global_norm(update) if update is not None else None
        if privacy is not None:
            row["privacy"] = privacy.finish_round(r, sampled=clients, reports=reports)
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
        privacy=privacy.summary() if privacy is not None else None,
        wall_seconds=time.perf_counter() - started,
    )
    recorder.write_summary(summary)
    return summary


def private_aggregate(
    exp: Experiment,
    privacy: ServerPrivacy,
    meta: Params,
    round_idx: int,
    clients: list[int],
    client_states: dict[int, dict[str, Any]],
    *,
    rdp_cache: dict[tuple[float, float], Any] | None = None,
) -> tuple[Params | None, dict[int, dict[str, float]]]:
    """One DP round of the reference: what every sampled client sends, and the server's aggregate.

    * ``client-central``: the clients' raw mean meta-updates (computed in one vectorized pass),
      clipped, summed and noised by :meth:`ServerPrivacy.aggregate`.
    * ``client-local``: the same raw updates, each privatized by its client's
      :class:`ClientPrivacy` (:func:`~fedmeta.privacy.client_update.privatize_client_update`).
    * ``task``: every site's DP-SGD steps over its pool
      (:func:`~fedmeta.privacy.client_update.private_round`).

    Client accountants live in ``client_states`` (updated in place, as a site's node state is)
    and share ``rdp_cache``; a client whose own budget is spent sends nothing, as a Flower client
    answers with an error.

    Returns:
        The aggregate (``None`` when nothing was released: an empty cohort outside
        client-central) and each replying client's releasable ``privacy.*`` report.
    """
    from fedmeta.privacy.client_update import private_round, privatize_client_update

    cfg = exp.cfg
    mode = cfg.privacy.mode
    sent: dict[int, Params] = {}
    reports: dict[int, dict[str, float]] = {}
    if mode == "task":
        for cid in clients:
            try:
                update, extra, state = private_round(exp, meta, round_idx, cid, state=client_states.get(cid), rdp_cache=rdp_cache)
            except BudgetExhausted as exc:
                log.warning("round %d: client %d sends nothing: %s", round_idx, cid, exc)
                continue
            client_states[cid] = state
            sent[cid], reports[cid] = update.gradient, extra
    elif clients:
        raw = exp.round_updates(meta, round_idx, clients)
        clip_norm = privacy.client_config(round_idx).get(CLIP_NORM_KEY)
        for i, cid in enumerate(clients):
            update = MetaUpdate({k: v[i] for k, v in raw.updates.items()}, int(raw.weights[i]), {})
            client = ClientPrivacy(cfg, cid, state=client_states.get(cid), rdp_cache=rdp_cache)
            try:
                update, extra = privatize_client_update(cfg, client, update, round_idx=round_idx, clip_norm=clip_norm)
            except BudgetExhausted as exc:
                log.warning("round %d: client %d sends nothing: %s", round_idx, cid, exc)
                continue
            if mode == "client-local":
                client_states[cid] = client.state_dict()
            sent[cid], reports[cid] = update.gradient, extra
    order = sorted(sent)
    try:
        aggregate = privacy.aggregate(round_idx, [sent[c] for c in order], reference=meta, reports=[reports[c] for c in order])
    except ValueError:
        if sent:
            raise
        log.info("round %d: empty cohort, no update", round_idx)
        return None, reports
    return aggregate, reports
