"""One round loop for every path: the centralized reference and the Flower server are the same code.

:class:`RoundLoop` owns a run's server state (meta-parameters, server optimizer, round, privacy
policy, counters) and one round's steps::

    budget check -> sample -> transport -> validate -> stages -> optimizer -> account -> evaluate -> log
    -> checkpoint (which commits the round)

What differs between the paths is only *how the instructions reach the clients and the replies
come back*: a :class:`~fedmeta.federation.transport.Transport`. The in-process transport
(:class:`~fedmeta.federation.transport.InProcessTransport`, ``fedmeta centralized``) computes the
whole cohort in one vectorized pass; the Flower transport (:mod:`fedmeta.flower`) sends Flower
messages to nodes (``fedmeta simulate``, ``flwr run``, deployments). Resume, checkpoints,
``metrics.jsonl``, plots and ``summary.json`` are written here once, so ``simulate`` and
``centralized`` agree by construction.

Differential privacy plugs in through the :class:`RoundPolicy` (cohort sampling, extra train
instructions, the server stages that aggregate — the privacy mechanism's chain — per-round
accounting, the accountant state in the checkpoint: :class:`fedmeta.privacy.facade.ServerPrivacy`
has exactly this interface) and through the two transform lists.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedmeta.aggregation import stack, validate_update
from fedmeta.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedmeta.config import Config, to_dict
from fedmeta.errors import BudgetExhausted, CheckpointError, ConfigError, InconsistentReplies, UpdateRejected
from fedmeta.evaluation import evaluate
from fedmeta.experiment import Experiment, RoundResult, build_summary
from fedmeta.federation.client import COMPUTE_SECONDS, combine_eval_metrics, eval_cohort
from fedmeta.federation.directory import ClientDirectory
from fedmeta.federation.stages import (
    AggregationStage,
    RoundState,
    Stage,
    build_stages,
    load_stage_states,
    stage_states,
)
from fedmeta.outputs import EPISODE_PNG, RunRecorder, read_metrics, write_episode_montage
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.federation.transport import Transport
    from fedmeta.privacy.secure_sum import SecureSum

__all__ = [
    "ClientReply",
    "RoundPolicy",
    "PlainPolicy",
    "default_policy",
    "RoundLoop",
    "RoundLog",
    "UpdateTransform",
    "AggregateTransform",
    "ProgressFn",
]

log = logging.getLogger(__name__)

#: Reply metrics that may be ``+inf``: a client without noise (noise multiplier 0) reports that
#: its own epsilon is unbounded. NaN and ``-inf`` are refused everywhere.
UNBOUNDED_METRICS = frozenset({"privacy.epsilon"})

#: A round's validated client updates, and each one's releasable metrics (aligned; ``None``: none).
Updates = Sequence[Params]
Reports = Sequence[Mapping[str, Any]] | None

#: ``(round, metrics row) -> None``, called after every round.
ProgressFn = Callable[[int, dict[str, Any]], None]


@dataclass(frozen=True)
class ClientReply:
    """One client's decoded train reply."""

    client_id: int
    update: Params
    num_tasks: int
    metrics: dict[str, float]
    nbytes: int = 0


class RoundPolicy(Protocol):
    """What a round may delegate: cohort, extra instructions, the aggregating stages, accounting.

    The default is :class:`PlainPolicy`; :class:`fedmeta.privacy.facade.ServerPrivacy` (issue 5)
    implements the same methods to add clipping, noise and accounting (its stages are the privacy
    mechanism's, :mod:`fedmeta.privacy.stages`).
    """

    def rounds_to_run(self) -> int:
        """Rounds the run may take (``federation.rounds``, or fewer under a privacy budget).

        Raises:
            BudgetExhausted: if the run must not start.
        """
        ...

    def check_round(self, round_idx: int) -> None:
        """Refuse ``round_idx`` before anything of it is computed, if releasing it would exceed the budget.

        Raises:
            BudgetExhausted: if the round must not run.
        """
        ...

    def sample_clients(self, round_idx: int) -> list[int]:
        """Client ids of the round's cohort."""
        ...

    def client_config(self, round_idx: int) -> dict[str, float]:
        """Extra scalars for the round's train instructions."""
        ...

    def server_stages(self) -> list[Stage]:
        """The stages that turn the round's replies into its aggregate, in order (built once per run).

        :func:`~fedmeta.federation.stages.build_stages` puts them between the reply transforms and
        the aggregate transforms; their state is saved by name with the other stages'.
        """
        ...

    def aggregate(self, round_idx: int, updates: Updates, *, reference: Params, reports: Reports = None) -> Params:
        """The round's aggregate of validated updates (aligned with ``reports``), outside the loop."""
        ...

    def finish_round(
        self, round_idx: int, *, sampled: Sequence[int], reports: Mapping[int, Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Per-round bookkeeping after aggregation (the ``privacy`` entry of a metrics row)."""
        ...

    def summary(self) -> dict[str, Any] | None:
        """The ``privacy`` entry of ``summary.json`` (``None``: no DP)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State saved in the checkpoint's accountant slot."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


class PlainPolicy:
    """No privacy: the config's cohort sampling and aggregation, weighted by tasks.

    Exactly what the centralized reference does (:meth:`Experiment.sample_round`,
    :meth:`Experiment.aggregate`), so that both paths agree.
    """

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp

    def rounds_to_run(self) -> int:
        return self.exp.cfg.federation.rounds

    def check_round(self, round_idx: int) -> None:
        return None

    def sample_clients(self, round_idx: int) -> list[int]:
        return self.exp.sample_round(round_idx)

    def client_config(self, round_idx: int) -> dict[str, float]:
        return {}

    def server_stages(self) -> list[Stage]:
        return [AggregationStage(self)]

    def aggregate(self, round_idx: int, updates: Updates, *, reference: Params, reports: Reports = None) -> Params:
        if not updates:
            raise ValueError(f"round {round_idx}: no updates to aggregate")
        weights = torch.tensor(
            [float((r or {}).get("num_tasks", 1)) for r in (reports or [{}] * len(updates))], dtype=torch.float64
        )
        return self.exp.aggregate(RoundResult([], stack(list(updates)), weights, {}))

    def finish_round(
        self, round_idx: int, *, sampled: Sequence[int], reports: Mapping[int, Mapping[str, Any]] | None = None
    ) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def default_policy(exp: Experiment) -> RoundPolicy:
    """The round policy of ``exp.cfg``: :class:`ServerPrivacy` under DP, :class:`PlainPolicy` without."""
    from fedmeta.privacy.mechanisms import mechanism_for

    if not mechanism_for(exp.cfg).enabled:
        return PlainPolicy(exp)
    from fedmeta.privacy.facade import ServerPrivacy

    return ServerPrivacy(exp.cfg)


#: ``(round, replies) -> replies``: post-processing of per-client updates before aggregation
#: (e.g. clipping). Must keep keys and shapes.
UpdateTransform = Callable[[int, list[ClientReply]], list[ClientReply]]
#: ``(round, aggregate, replies) -> aggregate``: post-processing before the optimizer step
#: (e.g. server-side noise, mixing in a server-computed meta-gradient).
AggregateTransform = Callable[[int, Params, list[ClientReply]], Params]


@dataclass
class RoundLog:
    """Bookkeeping of one round: who was asked, who answered, what was refused, and timings."""

    round_idx: int
    sampled: list[int]
    replies: dict[int, ClientReply] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    unavailable: list[int] = field(default_factory=list)
    retries: int = 0
    bytes_down: int = 0
    #: under secure aggregation: the unmasked sum of the survivors' updates (no per-client replies)
    secure_sum: SecureSum | None = None
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add_time(self, name: str, seconds: float) -> None:
        """Accumulate ``seconds`` under ``name``."""
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    @property
    def pending(self) -> list[int]:
        """Sampled clients that failed (errors, timeouts) and may be asked again."""
        return sorted(self.failed)


class RoundLoop:
    """A meta-learning run's server state and its rounds, for every transport.

    Args:
        cfg: the run configuration.
        out_dir: output directory (metrics.jsonl, summary.json, checkpoint.pt, plots).
        mode: ``summary.json``'s ``mode`` (``"centralized"``, ``"simulation"``, ``"deployment"``, ...).
        resume: continue from ``out_dir/checkpoint.pt`` at the next round, with the same
            meta-parameters, optimizer state, policy (accountant) state, transport state and round.
        experiment: a prebuilt :class:`Experiment` for ``cfg``.
        policy: cohort/aggregation/accounting policy (default: :func:`default_policy`, i.e.
            :class:`~fedmeta.privacy.facade.ServerPrivacy` for a DP config, else :class:`PlainPolicy`).
        update_transforms: applied, in order, to the validated per-client updates.
        aggregate_transforms: applied, in order, to the aggregate before the optimizer step.
        server_eval: evaluate on the server's held-out tasks (default ``eval.server``; the
            centralized reference always does).

    Raises:
        CheckpointError: if ``resume`` is set and the checkpoint is missing or incompatible.
        BudgetExhausted: if the privacy budget refuses the run (``policy.rounds_to_run``).
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path,
        *,
        mode: str = "simulation",
        resume: bool = False,
        experiment: Experiment | None = None,
        policy: RoundPolicy | None = None,
        update_transforms: Sequence[UpdateTransform] = (),
        aggregate_transforms: Sequence[AggregateTransform] = (),
        server_eval: bool | None = None,
    ) -> None:
        self.started = time.perf_counter()
        self.cfg = cfg
        self.mode = mode
        self.exp = experiment or Experiment(cfg)
        self.policy: RoundPolicy = policy or default_policy(self.exp)
        self.out_dir = Path(out_dir)
        if cfg.meta.algorithm == "metasgd" and cfg.eval.steps > cfg.meta.inner_steps:
            log.warning(
                "Meta-SGD's learned rates are tuned for meta.inner_steps=%d; evaluating %d steps with them "
                "may diverge (set eval.steps=%d to evaluate what was trained)",
                cfg.meta.inner_steps, cfg.eval.steps, cfg.meta.inner_steps,
            )  # fmt: skip
        self.meta = self.exp.initial_meta_params()
        self.optimizer = self.exp.server_optimizer(self.meta)
        self.round = 0
        from fedmeta.privacy.mechanisms import mechanism_for

        mechanism = mechanism_for(cfg)
        #: ``t`` when the server receives only secure sums (``None``: per-client replies)
        self.min_survivors: int | None = mechanism.min_survivors(cfg) if mechanism.secure_sum else None
        if self.min_survivors is not None and update_transforms:
            raise ConfigError(
                f"privacy.mode '{mechanism.name}' hands the server only the sum of the updates: reply transforms "
                "(per-update validation or clipping on the server) cannot apply; bound updates on the clients"
            )
        self.totals = {"failed": 0, "rejected": 0, "unavailable": 0, "bytes_down": 0, "bytes_up": 0, "retries": 0}
        self.transport: Transport | None = None
        self._transport_state: dict[str, Any] = {}
        self._stage_states: dict[str, Any] = {}
        #: ``summary.json``'s mode of the run that wrote the resumed checkpoint (``None``: a fresh run)
        self.resumed_from: str | None = None
        if resume:
            self._load(self.out_dir / "checkpoint.pt")
        # the privacy budget may refuse the run or cut it short (privacy.on_budget: stop); planned after the
        # checkpoint's accountant is restored, so that a resumed run's plan composes on top of what it spent
        self.rounds_limit = int(self.policy.rounds_to_run())
        #: The server chain: reply transforms, aggregation, aggregate transforms, optimizer (+ schedule).
        from fedmeta.generators.virtual import generator_stages

        self.stages: list[Stage] = build_stages(
            cfg,
            self.policy,
            self.optimizer,
            update_transforms=update_transforms,
            aggregate_transforms=aggregate_transforms,
            aggregate_stages=generator_stages(cfg, self.exp, rounds=self.rounds_limit),
            rounds=self.rounds_limit,
        )
        load_stage_states(self.stages, self._stage_states, path=str(self.out_dir / "checkpoint.pt"))
        self.recorder = RunRecorder(self.out_dir, resume_round=self.round if resume else None)
        evaluate_here = cfg.eval.server if server_eval is None else server_eval
        self._eval_tasks = self.exp.source.eval_tasks() if evaluate_here else None
        self.final_eval: dict[str, Any] | None = None
        self.last_client_eval: dict[str, Any] | None = None

    # -- state -----------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        check_compatible(state, self.exp.model.param_shapes, path=path, task_kind=self.exp.kind)
        if set(state["meta_params"]) != set(self.meta):
            raise CheckpointError(f"checkpoint '{path}' was written by a different algorithm")
        self.meta = {k: v.to(self.meta[k].dtype) for k, v in state["meta_params"].items()}
        self.optimizer = self.exp.server_optimizer(self.meta)
        if state.get("optimizer"):
            self._load_optimizer(state, path)
        if state.get("accountant"):
            if not self.policy.state_dict():  # a DP run resumed without DP would drop its accountant
                raise CheckpointError(
                    f"checkpoint '{path}' holds privacy state (an accountant); this run has privacy.mode "
                    f"'{self.cfg.privacy.mode}', which would drop it: resume with the checkpoint's privacy settings"
                )
            try:
                self.policy.load_state_dict(state["accountant"])
            except CheckpointError:
                raise
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
                raise CheckpointError(f"checkpoint '{path}': its privacy state cannot be restored: {exc!r}") from exc
        elif self.policy.state_dict():
            raise CheckpointError(
                f"checkpoint '{path}' holds no privacy state; this run has privacy.mode '{self.cfg.privacy.mode}'"
            )
        self.round = int(state["round"])  # load_checkpoint checked it is a non-negative integer
        extra = dict(state.get("extra") or {})
        totals = extra.pop("totals", {})
        if not isinstance(totals, dict) or not all(
            k in self.totals and isinstance(v, int) and not isinstance(v, bool) for k, v in totals.items()
        ):
            raise CheckpointError(f"checkpoint '{path}': its 'totals' must map {sorted(self.totals)} to integers")
        self.totals.update(totals)
        self.resumed_from = str(extra.pop("mode", None) or "unknown")
        stages = extra.pop("stages", None) or {}
        if not isinstance(stages, dict) or not all(isinstance(v, dict) for v in stages.values()):
            raise CheckpointError(f"checkpoint '{path}': its server-stage states must be a mapping of mappings")
        self._stage_states = dict(stages)
        self._transport_state = extra  # what the transport saved (e.g. in-process clients' accountants)
        log.info("resuming from %s at round %d", path, self.round + 1)

    def _load_optimizer(self, state: Mapping[str, Any], path: Path) -> None:
        config = state.get("config")
        meta = config.get("meta") if isinstance(config, Mapping) else None
        saved = meta.get("outer_optimizer") if isinstance(meta, Mapping) else None
        name = self.cfg.meta.outer_optimizer
        if saved is not None and saved != name:
            raise CheckpointError(
                f"checkpoint '{path}' was trained with meta.outer_optimizer '{saved}', this run has '{name}': its "
                f"optimizer state cannot be continued by another optimizer; resume with meta.outer_optimizer "
                f"'{saved}' (or start a new run from its meta-parameters)"
            )
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError, IndexError) as exc:
            raise CheckpointError(
                f"checkpoint '{path}': its optimizer state cannot be restored for this run's "
                f"meta.outer_optimizer '{name}' "
                f"({type(exc).__name__}: {exc})"
            ) from exc

    def checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` atomically (meta-parameters, optimizer, policy and transport state, round)."""
        transport_state = self.transport.state_dict() if self.transport is not None else self._transport_state
        return save_checkpoint(
            self.recorder.checkpoint_path,
            meta_params=self.meta,
            round_idx=self.round,
            config=to_dict(self.cfg),
            model=self.exp.model.describe(),
            task_kind=self.exp.kind,
            optimizer=self.optimizer.state_dict(),
            accountant=self.policy.state_dict() or None,
            extra={"totals": dict(self.totals), "mode": self.mode, **self._stages_entry(), **transport_state},
        )

    def _stages_entry(self) -> dict[str, Any]:
        # the optimizer stage's state is the checkpoint's optimizer entry, the policy's its accountant
        states = stage_states(self.stages, skip=("optimizer",))
        return {"stages": states} if states else {}

    @property
    def finished(self) -> bool:
        """True once ``federation.rounds`` rounds (or the rounds the privacy budget allows) are done."""
        return self.round >= self.rounds_limit

    def directory(self) -> ClientDirectory:
        """An empty :class:`ClientDirectory` that checks sites against this server's model."""
        family = self.exp.source.family(None)
        return ClientDirectory(
            self.cfg.federation.clients_total,
            kind=self.exp.kind,
            input_shape=tuple(family.input_shape),
            output_dim=int(family.output_dim),
        )

    # -- the run ---------------------------------------------------------------------------

    def run(self, transport: Transport, *, progress: ProgressFn | None = None) -> dict[str, Any]:
        """Run the remaining rounds over ``transport`` and write the outputs.

        Args:
            transport: how instructions reach the clients and replies come back.
            progress: called after every round with the round number and its metrics row.

        Returns:
            The summary written to ``summary.json``.

        Raises:
            InconsistentReplies: if too few clients join, or a round gets too few valid replies
                (the checkpoint then holds the last completed round, and ``summary.json`` what
                the completed rounds produced).
        """
        self.transport = transport
        if self._transport_state:
            transport.load_state_dict(self._transport_state)
        try:
            transport.start(self)
            self.start()
            while not self.finished:
                try:
                    book = self.begin_round()
                except BudgetExhausted as exc:
                    if self.cfg.privacy.on_budget != "stop":
                        raise
                    log.warning("%s", exc)  # privacy.on_budget: stop -- a clean end after the last round that fits
                    self.rounds_limit = self.round
                    break
                transport.train(self, book)
                row = self.complete_round(book)
                if progress is not None:
                    progress(book.round_idx, row)
        except BaseException:
            try:  # keep what the completed rounds produced; the checkpoint already holds them
                self.finish(transport.summary_extra())
            except Exception as exc:  # noqa: BLE001 - never mask the error that stopped the run
                log.warning("could not write the summary of the stopped run: %s", exc)
            raise
        return self.finish(transport.summary_extra())

    # -- a round ---------------------------------------------------------------------------

    def start(self) -> None:
        """Log the round-0 evaluation of a fresh run."""
        if self.round == 0 and self._eval_tasks is not None:
            self.recorder.log_round({"round": 0, "eval": self.evaluate()})

    def begin_round(self) -> RoundLog:
        """Check that the next round fits the privacy budget, and sample its cohort.

        Raises:
            BudgetExhausted: if releasing the round would exceed ``privacy.target_epsilon`` (nothing
                of it has been computed; the checkpoint holds the rounds before it).
        """
        r = self.round + 1
        self.policy.check_round(r)
        return RoundLog(r, [int(c) for c in self.policy.sample_clients(r)])

    def instructions(self, round_idx: int, client_id: int) -> dict[str, Any]:
        """The flat config sent with a train instruction."""
        return {"round": int(round_idx), "client-id": int(client_id), **self.policy.client_config(round_idx)}

    def required_replies(self, book: RoundLog) -> int:
        """Valid replies the round needs: ``min_replies`` per ``clients_per_round`` sampled.

        With uniform sampling the cohort always has ``clients_per_round`` clients and this is
        ``min_replies``. A Poisson cohort varies in size (and may be empty): the minimum scales
        with the cohort actually drawn, ``ceil(min_replies × |cohort| / clients_per_round)``, so a
        small cohort is not aborted for missing its nominal size, and an empty one needs no reply
        (under client-central DP it releases pure noise, as DP-FedAvg does).
        """
        n = len(book.sampled)
        f = self.cfg.federation
        if n == f.clients_per_round:
            return min(self.cfg.min_replies, n)
        return min(n, math.ceil(self.cfg.min_replies * n / f.clients_per_round))

    def accept(self, book: RoundLog, reply: ClientReply) -> bool:
        """Validate a decoded reply and file it as a reply or a rejection.

        Returns:
            ``True`` if it will be aggregated.
        """
        cid = reply.client_id
        if cid not in book.sampled:
            book.rejected[cid] = "not in this round's cohort"
            return False
        try:
            validate_update(reply.update, self.meta, source=f"client {cid}")
            bad = [
                k
                for k, v in reply.metrics.items()
                if not (math.isfinite(v) or (k in UNBOUNDED_METRICS and v == math.inf))
            ]
            if bad:
                raise UpdateRejected(f"update from client {cid}: metric '{bad[0]}' is not finite")
            reply = self._bounded_task_count(book, reply)
        except UpdateRejected as exc:
            book.rejected[cid] = str(exc)
            book.failed.pop(cid, None)
            log.warning("round %d: rejected %s", book.round_idx, exc)
            return False
        book.replies[cid] = reply
        book.failed.pop(cid, None)
        return True

    def _bounded_task_count(self, book: RoundLog, reply: ClientReply) -> ClientReply:
        """``reply`` with its task count checked and capped at what a client computes in a round.

        The count is the reply's weight in the aggregate and in the train metrics, and the client
        claims it: one client claiming 10^9 tasks would set the weighted mean alone. A client
        computes ``meta.tasks_per_client × meta.local_steps`` tasks per round
        (:func:`~fedmeta.privacy.client_update.nominal_num_tasks`), so a larger claim is capped
        there (logged); a count below 1 is refused.

        Raises:
            UpdateRejected: if the count is not an integer of at least 1.
        """
        from fedmeta.privacy.client_update import nominal_num_tasks

        n = reply.num_tasks
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise UpdateRejected(f"update from client {reply.client_id}: task count {n!r} is not a positive integer")
        bound = nominal_num_tasks(self.cfg)
        if n <= bound:
            return reply
        log.warning(
            "round %d: client %d claims %d tasks; its weight is capped at %d "
            "(meta.tasks_per_client x meta.local_steps)",
            book.round_idx, reply.client_id, n, bound,
        )  # fmt: skip
        return replace(reply, num_tasks=bound)

    def accept_sum(self, book: RoundLog, total: SecureSum) -> None:
        """File a secure aggregation's unmasked sum (the round then has no per-client replies).

        Raises:
            InconsistentReplies: if this run does not aggregate secure sums, or the sum claims
                survivors that were not sampled this round.
        """
        if self.min_survivors is None:
            raise InconsistentReplies(f"round {book.round_idx}: a secure sum arrived, but privacy.mode "
                                      f"'{self.cfg.privacy.mode}' aggregates per-client replies")
        strangers = sorted(set(total.survivors) - set(book.sampled))
        if strangers or len(set(total.survivors)) != len(total.survivors):
            raise InconsistentReplies(
                f"round {book.round_idx}: the secure sum's survivors {strangers[:10] or list(total.survivors)[:10]} "
                "are not distinct clients of this round's cohort"
            )
        book.secure_sum = total

    def fail(self, book: RoundLog, client_id: int, reason: str) -> None:
        """Record a client that raised, timed out or could not be decoded."""
        if client_id in book.replies or client_id in book.rejected:
            return
        book.failed[client_id] = reason
        log.warning("round %d: client %d failed: %s", book.round_idx, client_id, reason)

    def complete_round(self, book: RoundLog) -> dict[str, Any]:
        """Aggregate the round's valid replies, step the optimizer, evaluate, log and checkpoint.

        The round is committed by its checkpoint, written last: its ``metrics.jsonl`` rows (and a
        federated evaluation's) are written and ``fsync``-ed first, and a resumed run drops rows
        after the checkpoint's round and reruns it. So a crash at any point loses no row and
        duplicates none. If anything fails before the checkpoint is written, the loop's state
        (meta-parameters, optimizer, policy, stages, counters, round) is restored to the last
        checkpoint's and the round's rows are dropped: what ``summary.json`` then reports is
        what the checkpoint holds.

        Returns:
            The metrics row written to ``metrics.jsonl`` (with the federated evaluation, if one ran).

        Raises:
            InconsistentReplies: if fewer than the required valid replies arrived.
        """
        r = book.round_idx
        need = self.required_replies(book)
        replies = [book.replies[c] for c in sorted(book.replies)]
        if self.min_survivors is not None:
            self._require_secure_sum(book)
            replies = []
        elif len(replies) < need:
            raise InconsistentReplies(
                f"round {r}: only {len(replies)} valid replies from {len(book.sampled)} sampled clients "
                f"(needed {need}, federation.min_replies={self.cfg.min_replies}); failed: {_brief(book.failed)}; "
                f"rejected: {_brief(book.rejected)}; unavailable: {book.unavailable[:10]}. "
                f"The checkpoint in {self.out_dir} holds round {self.round}; fix the clients and resume"
            )
        saved = self._snapshot()
        try:
            return self._advance(book, replies)
        except BaseException:
            self._restore(saved)
            raise

    def _require_secure_sum(self, book: RoundLog) -> None:
        """Refuse a round without a releasable secure sum: nothing of it was released, nothing moves.

        Raises:
            InconsistentReplies: if the protocol halted (no sum) or fewer than ``t`` updates survived.
        """
        assert self.min_survivors is not None
        total, r = book.secure_sum, book.round_idx
        why = None
        if total is None:
            why = "the secure aggregation halted and unmasked nothing"
        elif len(total.survivors) < self.min_survivors:
            why = f"only {len(total.survivors)} masked updates survived"
        if why is None:
            return
        raise InconsistentReplies(
            f"round {r}: {why} (privacy.min_survivors={self.min_survivors}, {len(book.sampled)} sampled; failed: "
            f"{_brief(book.failed)}; unavailable: {book.unavailable[:10]}). Nothing of round {r} was released or "
            f"accounted; the checkpoint in {self.out_dir} holds round {self.round}: resume to run round {r} again"
        )

    def _snapshot(self) -> dict[str, Any]:
        """The in-memory state the last checkpoint holds (copies, so that a failed round cannot touch them)."""
        return {
            "round": self.round,
            "meta": dict(self.meta),  # tensors are never changed in place: a new dict each round
            "optimizer": self.optimizer.state_dict(),
            "policy": copy.deepcopy(self.policy.state_dict()),
            "stages": copy.deepcopy(stage_states(self.stages, skip=("optimizer",))),
            "totals": dict(self.totals),
            "final_eval": self.final_eval,
            "last_client_eval": self.last_client_eval,
        }

    def _restore(self, saved: Mapping[str, Any]) -> None:
        """Undo a round that failed before its checkpoint (see :meth:`complete_round`)."""
        try:
            self.round = int(saved["round"])
            self.meta = dict(saved["meta"])
            self.optimizer.reset(self.meta, saved["optimizer"])
            if saved["policy"]:
                self.policy.load_state_dict(saved["policy"])
            load_stage_states(self.stages, saved["stages"], path=str(self.recorder.checkpoint_path))
            self.totals = dict(saved["totals"])
            self.final_eval, self.last_client_eval = saved["final_eval"], saved["last_client_eval"]
            self.recorder.drop_rows_after(self.round)
        except Exception as exc:  # noqa: BLE001 - never mask the error that stopped the round
            log.warning("could not restore the state of round %d after its failure: %s", saved["round"], exc)

    def _advance(self, book: RoundLog, replies: list[ClientReply]) -> dict[str, Any]:
        r = book.round_idx
        t0 = time.perf_counter()
        state = RoundState(r, self.meta, replies, secure_sum=book.secure_sum)
        for stage in self.stages:
            stage(state)
        replies = state.replies
        if state.meta is not None:
            self.meta = state.meta
        update_norm = state.info.pop("update_norm", None)
        book.add_time("aggregate", time.perf_counter() - t0)
        self.round = r
        privacy = self.policy.finish_round(
            r, sampled=book.sampled, reports={rep.client_id: rep.metrics for rep in replies}
        )
        row = self._row(book, replies, update_norm)
        row.update(state.info)
        if privacy:
            row["privacy"] = privacy
        if self.eval_due(r) and self._eval_tasks is not None:
            t0 = time.perf_counter()
            self.final_eval = row["eval"] = self.evaluate()
            book.add_time("server_eval", time.perf_counter() - t0)
        row["timing"] = {k: round(v, 6) for k, v in book.timings.items()}
        row["seconds"] = time.perf_counter() - book.started
        # rows first, checkpoint last: the checkpoint commits the round (a resume drops later rows)
        self.recorder.log_round(row)
        if self.transport is not None and self.cfg.eval.clients > 0 and self.eval_due(r):
            t0 = time.perf_counter()
            cohort = eval_cohort(self.cfg, r)
            per_client = max(1, math.ceil(self.cfg.eval.tasks / max(1, len(cohort))))
            results, failed = self.transport.evaluate(self, r, cohort, tasks_per_client=per_client)
            if results:
                row["client_eval"] = self.record_client_eval(r, results, failed)
            else:
                log.warning("round %d: no client returned evaluation metrics", r)
                row["client_eval"] = None
            row["timing"]["client_eval"] = time.perf_counter() - t0
        self.checkpoint()
        return row

    def _row(self, book: RoundLog, replies: list[ClientReply], update_norm: float | None) -> dict[str, Any]:
        tasks = sum(rep.num_tasks for rep in replies)
        train: dict[str, float] = {}
        if replies:
            for key in replies[0].metrics:
                # privacy.* reports (a site's epsilon, noisy clip bits) go to the privacy entry
                if (
                    key == COMPUTE_SECONDS
                    or key.startswith("privacy.")
                    or any(key not in rep.metrics for rep in replies)
                ):
                    continue
                train[key] = sum(rep.metrics[key] * rep.num_tasks for rep in replies) / tasks
        up = [rep.nbytes for rep in replies]
        if book.secure_sum is not None:  # one sum, no replies: the protocol's bytes shared by the survivors
            n = max(1, len(book.secure_sum.survivors))
            up = [int(book.secure_sum.nbytes / n)] * n
        compute = [rep.metrics.get(COMPUTE_SECONDS) for rep in replies]
        if any(c is not None for c in compute):
            book.timings["client_compute_sum"] = float(sum(c or 0.0 for c in compute))
        self.totals["failed"] += len(book.failed)
        self.totals["rejected"] += len(book.rejected)
        self.totals["unavailable"] += len(book.unavailable)
        self.totals["retries"] += book.retries
        self.totals["bytes_down"] += book.bytes_down * (len(book.sampled) - len(book.unavailable))
        self.totals["bytes_up"] += sum(up)
        return {
            "round": book.round_idx,
            "clients": len(book.sampled),
            "replies": len(book.secure_sum.survivors) if book.secure_sum is not None else len(replies),
            "failed": len(book.failed),
            "rejected": len(book.rejected),
            "unavailable": len(book.unavailable),
            "retries": book.retries,
            "tasks": tasks,
            "train": train,
            "update_norm": update_norm,
            "bytes": {
                "down_per_client": book.bytes_down,
                "up_per_client": (sum(up) / len(up)) if up else 0,
                "round_total": book.bytes_down * (len(book.sampled) - len(book.unavailable)) + sum(up),
            },
        }

    # -- evaluation ------------------------------------------------------------------------

    def eval_due(self, round_idx: int) -> bool:
        """Evaluate after every ``eval.every`` rounds and after the last one (of the budget, too)."""
        return round_idx % self.cfg.eval.every == 0 or round_idx in (self.cfg.federation.rounds, self.rounds_limit)

    def evaluate(self) -> dict[str, Any]:
        """Server-side evaluation on the held-out tasks (``eval.tasks``), like the reference."""
        if self._eval_tasks is None:
            raise ConfigError("eval.server is false: this server has no held-out tasks to evaluate on")
        result = evaluate(
            self.exp.algorithm, self.meta, self._eval_tasks, steps=self.cfg.eval.steps, batch=self.cfg.eval.batch
        )
        summary: dict[str, Any] = dict(result.summary())
        if self.cfg.generators.depth > 1 and self._eval_tasks.params is not None:
            from fedmeta.generators.pictures import error_by_param

            names = getattr(self.exp.source.family(None), "param_names", ("parameter",))
            summary["by_param"] = error_by_param(result.loss[:, -1], self._eval_tasks.params, names[0])
        return summary

    def record_client_eval(
        self, round_idx: int, results: Sequence[tuple[Mapping[str, float], int]], failed: int
    ) -> dict[str, Any]:
        """Combine a federated evaluation and add it to the last metrics row's record."""
        combined = combine_eval_metrics(results)
        combined["failed"] = failed
        self.last_client_eval = combined
        self.recorder.log_round({"round": round_idx, "client_eval": combined})
        return combined

    # -- the end ---------------------------------------------------------------------------

    def finish(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write plots and ``summary.json``; return the summary."""
        final = self.final_eval
        if final is None and self._eval_tasks is not None:
            final = self.final_eval = self.evaluate()
        if final is None:
            final = dict(self.last_client_eval or {})
            final["source"] = "clients"
            final["steps"] = self.cfg.eval.steps
        curves = {k: v for k, v in final.items() if k.endswith("_curve")}
        try:
            self.recorder.plot(curves)
            if self.cfg.generators.depth > 1:
                from fedmeta.generators.pictures import write_generator_pictures

                write_generator_pictures(read_metrics(self.recorder.metrics_path), self.out_dir, self.cfg)
            if self.exp.kind == "classification" and self._eval_tasks is not None:
                # a held-out episode with the adapted model's predictions, as the reference writes
                write_episode_montage(
                    self.exp.algorithm, self.meta, self._eval_tasks.slice(0, 1), self.out_dir / EPISODE_PNG,
                    steps=self.cfg.eval.steps, caption="held-out ",
                )
        except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose the summary
            log.warning("could not write plots: %s", exc)
        summary = build_summary(
            self.cfg,
            mode=self.mode,
            rounds_completed=self.round,
            final=final,
            privacy=self.policy.summary(),
            wall_seconds=time.perf_counter() - self.started,
            extra={"federation": {"totals": dict(self.totals), **dict(extra or {})}},
        )
        self.recorder.write_summary(summary)
        return summary


def _brief(reasons: Mapping[int, str], limit: int = 3) -> str:
    if not reasons:
        return "none"
    items = [f"client {c}: {why}" for c, why in sorted(reasons.items())[:limit]]
    more = len(reasons) - limit
    return "; ".join(items) + (f"; and {more} more" if more > 0 else "")
