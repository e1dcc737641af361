"""Logical clients served by a pool of Flower simulation nodes (``simulation.pool``).

``fedmeta simulate`` starts a fixed, small number of simulation nodes (``simulation.nodes``,
default one per Ray actor) instead of one node per registered client. Every round
:class:`PooledFlowerTransport` splits the seeded cohort (the same ``sample_clients`` draw as every
other path) into one contiguous share per node and sends each node the ids of the logical clients
it plays, with the round's meta-parameters once. The node computes its clients' updates in one
vectorized pass (:func:`fedmeta.federation.client.train_cohort`, what the in-process transport
computes for a whole cohort) and answers with one update per logical client in one reply; the
transport unpacks it into per-client replies, so validation, the server stages, per-client
clipping, noise and accounting are those of any other path. Failures and retries stay per
logical client: a node that fails fails its clients, each of which is retried like any failed
client. A registered client costs nothing (no node, no memory, no start-up query) until it is
sampled.

Under differential privacy a pooled node plays its clients one after another with each client's
own privacy state (:func:`fedmeta.privacy.client_update.private_round`), the state kept in the
simulation's client-privacy folder by client id (a client may be played by another node next
time), exactly what a node of its own would compute.

What cannot be pooled is decided by declarations (:func:`check_pooling`): a privacy mode whose
protocol treats a node as one party (``PrivacyMechanism.pools_clients``, e.g. secure aggregation)
refuses ``simulation.pool: true`` (set it false: one node per client); sites with their own data
on disk (``TaskFamily.site_data``) always get one node per site, since a node never plays two
sites' data. Deployments always have one node per site.

Message protocol (``RecordDict`` keys), next to :mod:`fedmeta.flower.records`':

* ``train.cohort``: server -> ``{"meta": ArrayRecord, "config": ConfigRecord(round, ...),
  "cohort": ConfigRecord(client-ids)}``; node -> ``{"update": ArrayRecord (each entry stacked
  over the answering clients), "metrics": MetricRecord(num-tasks and each metric as lists
  aligned with them), "cohort": ConfigRecord(client-ids, failed-ids, failed-reasons)}``.
* ``evaluate.cohort``: server -> like train (plus ``eval-tasks``); node -> ``{"metrics":
  MetricRecord(lists), "cohort": ConfigRecord(...)}``.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedmeta.algorithms import MetaUpdate
from fedmeta.config import Config
from fedmeta.errors import BudgetExhausted, InconsistentReplies, UpdateRejected
from fedmeta.experiment import Experiment
from fedmeta.federation.client import COMPUTE_SECONDS, check_received_meta, evaluate_on_client, train_cohort
from fedmeta.federation.loop import ClientReply, RoundLog, RoundLoop
from fedmeta.flower import records as fl
from fedmeta.flower.transport import Deadline, FlowerTransport, _ask, send_and_receive, timeout_deadline
from fedmeta.types import Params

__all__ = [
    "TRAIN_COHORT",
    "EVALUATE_COHORT",
    "CohortUpdate",
    "PooledFlowerTransport",
    "check_pooling",
    "pool_size",
    "split_cohort",
    "pack_cohort_instructions",
    "unpack_cohort_instructions",
    "pack_cohort_updates",
    "unpack_cohort_updates",
    "pack_cohort_eval",
    "unpack_cohort_eval",
    "play_train_cohort",
    "play_evaluate_cohort",
]

log = logging.getLogger(__name__)

#: Message types of a pooled node's train and evaluate handlers (Flower's ``<category>.<action>``).
TRAIN_COHORT = "train.cohort"
EVALUATE_COHORT = "evaluate.cohort"

_COHORT = "cohort"
_IDS, _FAILED, _REASONS = "client-ids", "failed-ids", "failed-reasons"


def check_pooling(cfg: Config) -> bool:
    """Whether ``fedmeta simulate`` runs ``cfg`` on a node pool (``simulation.pool``, where it may).

    Site folders (a task family whose clients are sites with their own data on disk,
    ``TaskFamily.site_data``) get one node per site whatever ``simulation.pool`` says: a node
    never plays two sites' data, so pooling plays generated clients only.

    Returns:
        ``True`` for a pool, ``False`` for one node per client.

    A privacy mode whose protocol treats each node as one party (``PrivacyMechanism.pools_clients``
    false: secure aggregation, where SecAgg+ masks per node) likewise gets one node per client.
    """
    from fedmeta.privacy.mechanisms import mechanism_for
    from fedmeta.tasks import TASK_FAMILIES

    if not cfg.simulation.pool:
        return False
    mechanism = mechanism_for(cfg)
    if not mechanism.pools_clients:
        log.info(
            "privacy.mode '%s': one simulation node per client (its protocol treats each node as one party)",
            mechanism.name,
        )
        return False
    if TASK_FAMILIES.get(cfg.task.name).site_data:
        log.info("task.name '%s': one simulation node per site (a node never plays two sites' data)", cfg.task.name)
        return False
    return True


def pool_size(cfg: Config, *, num_cpus: int | None = None, cpus_per_client: float = 1.0) -> int:
    """Nodes in the pool: ``simulation.nodes``, or one per Ray actor (CPUs / CPUs per client)."""
    if cfg.simulation.nodes is not None:
        return int(cfg.simulation.nodes)
    cpus = num_cpus if num_cpus is not None else (os.cpu_count() or 1)
    return max(1, int(cpus // cpus_per_client))


def split_cohort(clients: Sequence[int], nodes: Sequence[int]) -> dict[int, list[int]]:
    """The share of each node: the sorted cohort in contiguous, nearly equal parts (empty ones left out).

    Args:
        clients: the logical clients to play.
        nodes: the pool's node ids.

    Returns:
        ``node id -> client ids`` (sorted), at most one part per node.
    """
    order = sorted(int(c) for c in clients)
    parts = min(len(nodes), len(order))
    plan: dict[int, list[int]] = {}
    start = 0
    for i in range(parts):
        size = len(order) // parts + (1 if i < len(order) % parts else 0)
        plan[int(nodes[i])] = order[start : start + size]
        start += size
    return plan


# -- records ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CohortUpdate:
    """One logical client's update from a pooled node's reply."""

    client_id: int
    update: Params
    num_tasks: int
    metrics: dict[str, float]


def pack_cohort_instructions(arrays: ArrayRecord, config: Mapping[str, Any], client_ids: Sequence[int]) -> RecordDict:
    """Instructions for the logical clients ``client_ids`` of one node (meta-parameters sent once)."""
    content = fl.instructions_content(arrays, config)
    content[_COHORT] = ConfigRecord({_IDS: [int(c) for c in client_ids]})
    return content


def unpack_cohort_instructions(message: Message) -> tuple[Params, dict[str, Any], list[int]]:
    """Meta-parameters, the shared config and the client ids of pooled instructions.

    Raises:
        UpdateRejected: if a record is missing.
    """
    meta, config = fl.unpack_instructions(message)
    try:
        ids = [int(c) for c in message.content.config_records[_COHORT][_IDS]]  # type: ignore[union-attr]
    except (KeyError, TypeError, ValueError) as exc:
        raise UpdateRejected(f"pooled instructions lack their client ids: {exc}") from exc
    return meta, config, ids


def _cohort_record(ids: Sequence[int], failures: Mapping[int, str]) -> ConfigRecord:
    return ConfigRecord(
        {
            _IDS: [int(c) for c in ids],
            _FAILED: [int(c) for c in failures],
            _REASONS: [str(failures[c]) for c in failures],
        }
    )


def _metric_lists(rows: Sequence[Mapping[str, float]], ids: Sequence[int]) -> dict[str, list[float]]:
    """Per-client metric dicts as one list per key (every client must report the same keys)."""
    keys = list(rows[0]) if rows else []
    for cid, row in zip(ids, rows, strict=True):
        if list(row) != keys:
            raise ValueError(f"client {cid} reports metrics {sorted(row)}, the others {sorted(keys)}")
    return {k: [float(row[k]) for row in rows] for k in keys}


def pack_cohort_updates(
    updates: Mapping[int, MetaUpdate],
    failures: Mapping[int, str] | None = None,
    extra_metrics: Mapping[int, Mapping[str, float]] | None = None,
) -> RecordDict:
    """A pooled node's train reply: each answering client's update, task count and metrics, and who failed.

    Args:
        updates: ``client id -> update`` of the clients that computed one.
        failures: ``client id -> reason`` of those that did not (e.g. a spent budget).
        extra_metrics: releasable metrics to add to a client's (e.g. its ``privacy.*`` scalars).

    Returns:
        The reply content (updates stacked per parameter, metrics as aligned lists).

    Raises:
        ValueError: if the clients' updates or metrics do not have the same keys.
    """
    ids = list(updates)
    extra = extra_metrics or {}
    rows = [{**updates[c].metrics, **extra.get(c, {})} for c in ids]
    metrics: dict[str, Any] = {fl.NUM_TASKS: [int(updates[c].num_tasks) for c in ids], **_metric_lists(rows, ids)}
    keys = list(updates[ids[0]].gradient) if ids else []
    stacked = {k: torch.stack([updates[c].gradient[k] for c in ids]) for k in keys}
    return RecordDict(
        {
            "update": fl.params_to_record(stacked),
            "metrics": MetricRecord(metrics),
            _COHORT: _cohort_record(ids, dict(failures or {})),
        }
    )


def _reply_cohort(message: Message) -> tuple[list[int], dict[int, str]]:
    if message.has_error():
        err = message.error
        raise UpdateRejected(f"node error {err.code}: {err.reason}")
    try:
        rec = message.content.config_records[_COHORT]
        ids = [int(c) for c in rec[_IDS]]  # type: ignore[union-attr]
        failed = [int(c) for c in rec[_FAILED]]  # type: ignore[union-attr]
        reasons = [str(w) for w in rec[_REASONS]]  # type: ignore[union-attr]
    except (KeyError, TypeError, ValueError) as exc:
        raise UpdateRejected(f"pooled reply lacks its client ids: {exc}") from exc
    if len(failed) != len(reasons):
        raise UpdateRejected(f"pooled reply names {len(failed)} failed clients and {len(reasons)} reasons")
    return ids, dict(zip(failed, reasons, strict=True))


def _metric_columns(message: Message, n: int) -> dict[str, list[float]]:
    try:
        record = message.content.metric_records["metrics"]
    except KeyError as exc:
        raise UpdateRejected(f"pooled reply lacks the record {exc}") from exc
    columns: dict[str, list[float]] = {}
    for key, values in record.items():
        column = [float(v) for v in values] if isinstance(values, list) else []
        if len(column) != n:
            raise UpdateRejected(f"pooled reply: metric '{key}' has {len(column)} values for {n} clients")
        columns[key] = column
    return columns


def unpack_cohort_updates(message: Message) -> tuple[list[CohortUpdate], dict[int, str]]:
    """The per-client updates and the failed clients of a pooled node's train reply.

    Raises:
        UpdateRejected: if the reply is an error or malformed (then none of its clients answered).
    """
    ids, failures = _reply_cohort(message)
    try:
        stacked = fl.record_to_params(message.content.array_records["update"])
    except KeyError as exc:
        raise UpdateRejected(f"pooled reply lacks the record {exc}") from exc
    for key, value in stacked.items():
        if value.dim() == 0 or value.shape[0] != len(ids):
            raise UpdateRejected(f"pooled reply: update '{key}' holds {tuple(value.shape)} for {len(ids)} clients")
    columns = _metric_columns(message, len(ids))
    tasks = columns.pop(fl.NUM_TASKS, None)
    if tasks is None and ids:
        raise UpdateRejected("pooled reply lacks the clients' task counts")
    out = []
    for i, cid in enumerate(ids):
        n = tasks[i] if tasks is not None else 0.0
        if not (n >= 1 and float(n).is_integer()):
            raise UpdateRejected(f"pooled reply reports {n!r} tasks for client {cid}; a positive integer is required")
        update = {k: v[i] for k, v in stacked.items()}
        out.append(CohortUpdate(cid, update, int(n), {k: col[i] for k, col in columns.items()}))
    return out, failures


def pack_cohort_eval(results: Mapping[int, tuple[Mapping[str, float], int]], failures: Mapping[int, str]) -> RecordDict:
    """A pooled node's evaluate reply: each client's aggregate metrics and task count."""
    ids = list(results)
    rows = [results[c][0] for c in ids]
    metrics: dict[str, Any] = {fl.NUM_TASKS: [int(results[c][1]) for c in ids], **_metric_lists(rows, ids)}
    return RecordDict({"metrics": MetricRecord(metrics), _COHORT: _cohort_record(ids, failures)})


def unpack_cohort_eval(message: Message) -> tuple[list[tuple[dict[str, float], int]], dict[int, str]]:
    """Per-client ``(metrics, tasks)`` and the failed clients of a pooled evaluate reply.

    Raises:
        UpdateRejected: if the reply is an error or malformed.
    """
    ids, failures = _reply_cohort(message)
    columns = _metric_columns(message, len(ids))
    tasks = columns.pop(fl.NUM_TASKS, [0.0] * len(ids))
    return [({k: col[i] for k, col in columns.items()}, int(tasks[i])) for i in range(len(ids))], failures


# -- the node's side ----------------------------------------------------------------------------


def play_train_cohort(
    exp: Experiment,
    meta: Params,
    config: Mapping[str, Any],
    client_ids: Sequence[int],
    *,
    state_dir: str | Path | None,
    rdp_cache: dict[tuple[float, float], Any] | None = None,
) -> RecordDict:
    """What a pooled node computes for ``train.cohort`` instructions: one reply for all its clients.

    Without DP one vectorized pass (:func:`fedmeta.federation.client.train_cohort`); under DP
    each client's own private round, its state read from and written to ``state_dir`` by client id.

    Args:
        exp: the node's experiment.
        meta: the received meta-parameters.
        config: the shared instructions (``round``, and under DP ``privacy.clip_norm``).
        client_ids: the logical clients to play.
        state_dir: where the clients keep their privacy state (DP only).
        rdp_cache: the node's cache of Opacus' RDP curves.

    Returns:
        The reply content (:func:`pack_cohort_updates`).

    Raises:
        UpdateRejected: if the meta-parameters do not fit the model (every client fails).
    """
    from fedmeta.privacy.mechanisms import CLIP_NORM_KEY, mechanism_for

    round_idx = int(config["round"])
    if not mechanism_for(exp.cfg).enabled:
        started = time.perf_counter()
        updates = train_cohort(exp, meta, round_idx, client_ids)
        # each client's share of the node's compute time (the loop sums them: the node's time)
        share = {COMPUTE_SECONDS: (time.perf_counter() - started) / max(1, len(client_ids))}
        return pack_cohort_updates(dict(zip(client_ids, updates, strict=True)), {}, dict.fromkeys(client_ids, share))
    from fedmeta.privacy.client_update import private_round

    check_received_meta(exp, meta)
    clip = config.get(CLIP_NORM_KEY)
    done: dict[int, MetaUpdate] = {}
    extra: dict[int, dict[str, float]] = {}
    failures: dict[int, str] = {}
    for cid in client_ids:
        try:
            # state=None: the client's state comes from state_dir (another node may have played it last)
            update, releasable, _ = private_round(
                exp, meta, round_idx, int(cid), state=None, clip_norm=None if clip is None else float(clip),
                state_dir=state_dir, rdp_cache=rdp_cache,
            )  # fmt: skip
        except BudgetExhausted as exc:
            failures[int(cid)] = f"BudgetExhausted: {exc}"
            continue
        # only the privatized update, a nominal task count and privacy.* scalars leave the client
        done[int(cid)] = MetaUpdate(update.gradient, update.num_tasks, {})
        extra[int(cid)] = dict(releasable)
    return pack_cohort_updates(done, failures, extra)


def play_evaluate_cohort(
    exp: Experiment, meta: Params, config: Mapping[str, Any], client_ids: Sequence[int]
) -> RecordDict:
    """What a pooled node computes for ``evaluate.cohort``: each client's aggregate metrics."""
    check_received_meta(exp, meta)
    tasks = int(config["eval-tasks"])
    results = {int(c): evaluate_on_client(exp, meta, int(c), num_tasks=tasks) for c in client_ids}
    return pack_cohort_eval(results, {})


# -- the server's side --------------------------------------------------------------------------


class PooledFlowerTransport(FlowerTransport):
    """A :class:`~fedmeta.flower.transport.FlowerTransport` whose nodes each play several logical clients.

    Args:
        grid: Flower's (simulation) grid.
        nodes: the pool's size (the transport waits for that many nodes at start-up).
        deadline: when an exchange stops waiting for missing replies.
        poll_interval: seconds between two pulls of replies.
    """

    def __init__(
        self,
        grid: Grid,
        *,
        nodes: int,
        deadline: Deadline = timeout_deadline,
        poll_interval: float | None = None,
    ) -> None:
        super().__init__(grid, deadline=deadline, poll_interval=poll_interval)
        self.pool_nodes = nodes
        self.nodes: list[int] = []

    def start(self, loop: RoundLoop) -> None:
        """Wait for the pool's nodes and check each one's data layout against the model.

        No client is asked anything: every id ``0 .. clients_total-1`` can be played by any node.

        Raises:
            InconsistentReplies: if no node of the pool answered with a fitting layout.
        """
        cfg, f = loop.cfg, loop.cfg.federation
        log.info(
            "fedmeta over a pool of %d Flower nodes: %s on %s, %d of %d clients per round, %d rounds",
            self.pool_nodes, cfg.meta.algorithm, cfg.task.name, f.clients_per_round, f.clients_total, f.rounds,
        )  # fmt: skip
        fl.prepare_grid(self.grid)
        t0 = time.perf_counter()
        self.directory = directory = loop.directory()
        until = time.monotonic() + f.join_timeout
        nodes = set(self.grid.get_node_ids())
        while len(nodes) < self.pool_nodes and time.monotonic() < until:
            time.sleep(0.05)
            nodes = set(self.grid.get_node_ids())
        answers = _ask(self.grid, cfg, nodes, until, self.query_batch, self.deadline, self.poll_interval)
        for node, answer in sorted(answers.items()):
            if answer is None or isinstance(answer, str):
                directory.refused[node] = answer or "no answer to the start-up query"
                continue
            problem = directory.check(replace(answer, client_id=-1))
            if problem is None:
                self.nodes.append(node)
            else:
                directory.refused[node] = problem
        if not self.nodes:
            raise InconsistentReplies(
                f"none of the {len(nodes)} pool nodes answered the start-up query with a fitting data layout within "
                f"federation.join_timeout={f.join_timeout:g}s: {list(directory.refused.values())[:3]}"
            )
        log.info("%d pool nodes play %d registered clients", len(self.nodes), f.clients_total)
        self.timings["discovery_seconds"] = self.timings.get("discovery_seconds", 0.0) + time.perf_counter() - t0

    def refresh(self, loop: RoundLoop) -> None:
        """Drop pool nodes that left (simulation nodes do not come and go)."""
        alive = set(self.grid.get_node_ids())
        self.nodes = [n for n in self.nodes if n in alive]

    def train(self, loop: RoundLoop, book: RoundLog) -> None:
        """Send each node its share of the cohort, file one reply per logical client, retry failed clients."""
        f = loop.cfg.federation
        if book.round_idx > 1:
            self.refresh(loop)
        arrays = fl.params_to_record(loop.meta)
        self._train_exchange(loop, book, list(book.sampled), arrays)
        while len(book.replies) < loop.required_replies(book) and book.pending and book.retries < f.max_retries:
            book.retries += 1
            log.warning("round %d: retry %d for clients %s", book.round_idx, book.retries, sorted(book.pending)[:10])
            self._train_exchange(loop, book, list(book.pending), arrays)

    def evaluate(
        self, loop: RoundLoop, round_idx: int, cohort: Sequence[int], *, tasks_per_client: int
    ) -> tuple[list[tuple[Mapping[str, float], int]], int]:
        """Evaluate instructions to each node's share of ``cohort``; aggregates only leave the clients."""
        plan = split_cohort(cohort, self.nodes)
        arrays = fl.params_to_record(loop.meta)
        messages = self._cohort_messages(loop, round_idx, plan, arrays, {"eval-tasks": tasks_per_client}, None)
        replies = self._pool_send(messages, EVALUATE_COHORT, round_idx, loop.cfg.federation.round_timeout)
        results: list[tuple[Mapping[str, float], int]] = []
        answered = 0
        for reply in replies:
            try:
                got, _ = unpack_cohort_eval(reply)
            except UpdateRejected as exc:
                log.warning("round %d: evaluation on node %s failed: %s", round_idx, reply.metadata.src_node_id, exc)
                continue
            results.extend(got)
            answered += len(got)
        return results, len(cohort) - answered

    def summary_extra(self) -> dict[str, Any]:
        """The pool's size, nodes refused and discovery time (every registered client is reachable)."""
        d = self.directory
        return {
            "clients_registered": d.clients_total if d is not None else 0,
            "pool_nodes": len(self.nodes),
            "nodes_refused": len(d.refused) if d is not None else 0,
            "nodes_contested": 0,
            **self.timings,
        }

    # -- helpers ------------------------------------------------------------------------------

    def _cohort_messages(
        self,
        loop: RoundLoop,
        round_idx: int,
        plan: Mapping[int, Sequence[int]],
        arrays: ArrayRecord,
        config: Mapping[str, Any],
        book: RoundLog | None,
    ) -> list[Message]:
        ttl = loop.cfg.federation.round_timeout + 60.0
        kind = EVALUATE_COHORT if book is None else TRAIN_COHORT
        messages = []
        for node, share in plan.items():
            shared = _shared_instructions(loop, round_idx, share)
            content = pack_cohort_instructions(arrays, {**shared, **config}, share)
            if book is not None and not book.bytes_down:
                # what one logical client receives: the meta-parameters and its instructions
                one = fl.instructions_content(arrays, loop.instructions(round_idx, share[0]))
                book.bytes_down = fl.record_nbytes(one)
            messages.append(Message(content, node, kind, ttl=ttl, group_id=str(round_idx)))
        return messages

    def _pool_send(self, messages: list[Message], kind: str, round_idx: int, timeout: float) -> list[Message]:
        return send_and_receive(
            self.grid, messages, kind=kind, round_idx=round_idx, timeout=timeout, deadline=self.deadline,
            poll_interval=self.poll_interval,
        )  # fmt: skip

    def _train_exchange(self, loop: RoundLoop, book: RoundLog, clients: list[int], arrays: ArrayRecord) -> None:
        if not clients:  # e.g. an empty Poisson cohort
            return
        r, timeout = book.round_idx, loop.cfg.federation.round_timeout
        t = time.perf_counter()
        plan = split_cohort(clients, self.nodes)
        messages = self._cohort_messages(loop, r, plan, arrays, {}, book)
        book.add_time("configure", time.perf_counter() - t)
        t = time.perf_counter()
        replies = self._pool_send(messages, TRAIN_COHORT, r, timeout)
        book.add_time("send_receive", time.perf_counter() - t)
        t = time.perf_counter()
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            share = plan.get(node)
            if share is None:
                log.warning("round %d: reply from node %s, which was sent nothing, ignored", r, node)
                continue
            answered.add(node)
            self._file_train_reply(loop, book, node, share, reply)
        for node in plan.keys() - answered:
            for cid in plan[node]:
                loop.fail(book, cid, f"no reply within federation.round_timeout={timeout:g}s (pool node {node})")
        book.add_time("collect", time.perf_counter() - t)

    def _file_train_reply(self, loop: RoundLoop, book: RoundLog, node: int, share: list[int], reply: Message) -> None:
        try:
            got, failures = unpack_cohort_updates(reply)
        except UpdateRejected as exc:
            if reply.has_error():  # the node failed: so did each of its clients
                for cid in share:
                    loop.fail(book, cid, str(exc))
            else:  # undecodable: refused like an invalid update, no longer pending
                for cid in share:
                    book.rejected[cid] = str(exc)
                    book.failed.pop(cid, None)
                log.warning("round %d: rejected the reply of pool node %s: %s", book.round_idx, node, exc)
            return
        nbytes = fl.record_nbytes(reply.content) // max(1, len(got))
        expected = set(share)
        for item in got:
            if item.client_id not in expected:
                log.warning("round %d: node %s answered for client %d, not in its share", book.round_idx, node,
                            item.client_id)  # fmt: skip
                continue
            expected.discard(item.client_id)
            loop.accept(book, ClientReply(item.client_id, item.update, item.num_tasks, item.metrics, nbytes=nbytes))
        for cid, why in failures.items():
            if cid in expected:
                expected.discard(cid)
                loop.fail(book, cid, why)
        for cid in sorted(expected):
            loop.fail(book, cid, f"pool node {node} replied without client {cid}")


def _shared_instructions(loop: RoundLoop, round_idx: int, share: Sequence[int]) -> dict[str, Any]:
    """The instructions common to ``share`` (``loop.instructions`` without the client id).

    Raises:
        RuntimeError: if the instructions differ between clients beyond their id (a pooled message
            carries one set for all its clients).
    """
    first = {k: v for k, v in loop.instructions(round_idx, share[0]).items() if k != "client-id"}
    for cid in share[1:]:
        other = {k: v for k, v in loop.instructions(round_idx, cid).items() if k != "client-id"}
        if other != first:
            raise RuntimeError(f"round {round_idx}: instructions of client {cid} differ from client {share[0]}'s")
    return first
