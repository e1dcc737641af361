"""The Flower transport: a :class:`~fedmeta.federation.loop.RoundLoop`'s rounds as Flower messages.

:class:`FlowerTransport` implements :class:`fedmeta.federation.transport.Transport` on a Flower
``Grid``: a start-up query that maps client ids to Flower node ids (so that cohorts are the seeded
``sample_clients`` draws every path uses), late joiners and departures, train and evaluate
messages, retries of failed clients, and the reply decoding. Aggregation, the server optimizer,
accounting, evaluation, checkpoints and outputs are the loop's, shared with the centralized
reference. It is not a Flower ``Strategy``: the loop, not ``Strategy.start``, drives the rounds.

Each exchange pushes its messages and pulls the replies itself (Flower's public
``Grid.push_messages`` / ``Grid.pull_messages``), every ``poll_interval`` seconds rather than
every 3 s as a deployment grid's ``send_and_receive`` does, until every reply is in or the
exchange's :data:`Deadline` says to stop waiting. The default deadline is the exchange's timeout
(``federation.round_timeout``, or ``federation.join_timeout`` for the start-up query); another
one can be injected, e.g. one that ends a round as soon as only a client known to be held back is
missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp import Grid

from fedmeta.config import Config
from fedmeta.errors import CheckpointError, InconsistentReplies, UpdateRejected
from fedmeta.federation.client import ClientIdentity
from fedmeta.federation.directory import ClientDirectory
from fedmeta.federation.loop import ClientReply, RoundLog, RoundLoop
from fedmeta.federation.transport import CLIENT_PRIVACY_STATE
from fedmeta.flower import records as fl

__all__ = [
    "DEPLOYMENT_POLL_INTERVAL",
    "Deadline",
    "FlowerTransport",
    "Waiting",
    "ask_sites",
    "poll_interval_of",
    "send_and_receive",
    "timeout_deadline",
]

log = logging.getLogger(__name__)

#: Seconds between two pulls of replies on a deployment grid (Flower's own ``send_and_receive`` waits 3 s).
DEPLOYMENT_POLL_INTERVAL = 0.2


def poll_interval_of(grid: Grid) -> float:
    """Seconds between two pulls of replies on ``grid``.

    The in-memory (simulation) grid's own ``pull_interval`` (see
    :func:`fedmeta.flower.records.prepare_grid`), :data:`DEPLOYMENT_POLL_INTERVAL` otherwise.
    """
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    return float(grid.pull_interval) if isinstance(grid, InMemoryGrid) else DEPLOYMENT_POLL_INTERVAL


@dataclass(frozen=True)
class Waiting:
    """Where one exchange stands while it waits for replies (what a :data:`Deadline` decides on).

    Attributes:
        kind: the message type (``train``, ``evaluate`` or ``query``).
        round_idx: the round (0 for the start-up query).
        pending_nodes: Flower node ids whose reply has not arrived.
        pending_clients: the client ids of those nodes, where the directory knows them.
        elapsed: seconds since the messages were pushed (monotonic clock).
        timeout: the exchange's configured timeout in seconds.
    """

    kind: str
    round_idx: int
    pending_nodes: frozenset[int]
    pending_clients: frozenset[int]
    elapsed: float
    timeout: float


#: Decides, after each pull that left replies missing, whether the exchange stops waiting (``True``):
#: the missing replies then count as "no reply within the timeout".
Deadline = Callable[[Waiting], bool]


def timeout_deadline(waiting: Waiting) -> bool:
    """The default :data:`Deadline`: stop once the exchange's timeout has elapsed.

    Args:
        waiting: the exchange's state.

    Returns:
        ``True`` once ``waiting.elapsed >= waiting.timeout``.
    """
    return waiting.elapsed >= waiting.timeout


class FlowerTransport:
    """The :class:`~fedmeta.federation.transport.Transport` of a Flower grid (simulation or deployment).

    Args:
        grid: Flower's grid.
        answers: start-up answers already collected with :func:`ask_sites` (a server that needed
            them to build its model); ``None`` asks in :meth:`start`.
        query_batch: nodes asked at once by the start-up query. Flower's in-memory state scans
            every stored message for every node, so smaller batches keep simulation sweeps short.
        deadline: when an exchange stops waiting for missing replies (default
            :func:`timeout_deadline`: after its timeout).
        poll_interval: seconds between two pulls of replies (default :func:`poll_interval_of` the grid).
    """

    def __init__(
        self,
        grid: Grid,
        *,
        answers: Mapping[int, ClientIdentity | str | None] | None = None,
        query_batch: int = 500,
        deadline: Deadline = timeout_deadline,
        poll_interval: float | None = None,
    ) -> None:
        self.grid = grid
        self.answers = answers
        self.query_batch = query_batch
        self.deadline = deadline
        self.poll_interval = poll_interval
        self.directory: ClientDirectory | None = None
        self.timings: dict[str, float] = {}

    # -- the Transport interface -------------------------------------------------------------

    def start(self, loop: RoundLoop) -> None:
        """Wait for the nodes to register, then ask each for its identity (start-up query).

        Raises:
            InconsistentReplies: if fewer clients than ``federation.min_replies`` answered.
        """
        cfg, f = loop.cfg, loop.cfg.federation
        log.info(
            "fedmeta over Flower: %s on %s, %d of %d clients per round, %d rounds, aggregation=%s, server %s lr=%g",
            cfg.meta.algorithm, cfg.task.name, f.clients_per_round, f.clients_total, f.rounds, f.aggregation,
            cfg.meta.outer_optimizer, cfg.meta.outer_lr,
        )  # fmt: skip
        fl.prepare_grid(self.grid)
        t0 = time.perf_counter()
        self.directory = loop.directory()
        answers = (
            self.answers
            if self.answers is not None
            else ask_sites(
                self.grid, cfg, query_batch=self.query_batch, deadline=self.deadline, poll_interval=self.poll_interval
            )
        )
        self._register(answers)
        if len(self.directory) < cfg.min_replies:
            raise InconsistentReplies(
                f"only {len(self.directory)} clients answered the start-up query within "
                f"federation.join_timeout={f.join_timeout:g}s ({len(answers)} nodes connected, "
                f"{len(self.directory.refused)} refused: {list(self.directory.refused.values())[:3]}); "
                f"a round needs federation.min_replies={cfg.min_replies}"
            )
        log.info("%d clients registered (%d nodes refused)", len(self.directory), len(self.directory.refused))
        self.timings["discovery_seconds"] = self.timings.get("discovery_seconds", 0.0) + time.perf_counter() - t0

    def train(self, loop: RoundLoop, book: RoundLog) -> None:
        """Send the round's train instructions, collect and file the replies, retry failed clients."""
        r, f = book.round_idx, loop.cfg.federation
        if r > 1:
            self.refresh(loop)
        if loop.min_survivors is not None:  # secure aggregation: the loop receives only the unmasked sum
            from fedmeta.flower.secagg import secure_train

            secure_train(self, loop, book)
            return
        directory = self._require_directory()
        t = time.perf_counter()
        arrays = fl.params_to_record(loop.meta)
        located, missing = directory.locate(book.sampled)
        book.unavailable = missing
        if missing:
            log.warning("round %d: %d sampled clients have no node: %s", r, len(missing), missing[:10])
        messages = self._messages(loop, book, located, arrays, {}, fl.TRAIN)
        book.add_time("configure", time.perf_counter() - t)
        self._exchange(loop, book, messages)
        while len(book.replies) < loop.required_replies(book) and book.pending and book.retries < f.max_retries:
            book.retries += 1
            located, _ = directory.locate(book.pending)
            log.warning("round %d: retry %d for clients %s", r, book.retries, sorted(located)[:10])
            self._exchange(loop, book, self._messages(loop, book, located, arrays, {}, fl.TRAIN))

    def evaluate(
        self, loop: RoundLoop, round_idx: int, cohort: Sequence[int], *, tasks_per_client: int
    ) -> tuple[list[tuple[Mapping[str, float], int]], int]:
        """Evaluate instructions to ``cohort``; task-weighted aggregates only leave the clients."""
        located, missing = self._require_directory().locate(cohort)
        failed = len(missing)
        book = RoundLog(round_idx, list(cohort))
        arrays = fl.params_to_record(loop.meta)
        messages = self._messages(loop, book, located, arrays, {"eval-tasks": tasks_per_client}, fl.EVALUATE)
        results: list[tuple[Mapping[str, float], int]] = []
        replies = self._send_and_receive(messages, fl.EVALUATE, round_idx, loop.cfg.federation.round_timeout)
        for reply in replies:
            try:
                results.append(fl.unpack_eval_metrics(reply))
            except UpdateRejected as exc:
                failed += 1
                log.warning("round %d: evaluation on node %s failed: %s", round_idx, reply.metadata.src_node_id, exc)
        return results, failed

    def state_dict(self) -> dict[str, Any]:
        """Nothing: the sites keep their own state."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore; refuse state that only the in-process transport can carry on.

        Raises:
            CheckpointError: if the checkpoint holds in-process clients' privacy accountants
                (written by ``fedmeta centralized``): Flower clients keep their own, so resuming
                here would restart those clients' accounting at zero.
        """
        if state.get(CLIENT_PRIVACY_STATE):
            raise CheckpointError(
                "the checkpoint holds the privacy accountants of in-process clients (written by fedmeta "
                "centralized); Flower clients keep their own, so this run would restart them: resume it with "
                "fedmeta centralized"
            )

    def summary_extra(self) -> dict[str, Any]:
        """Registered clients, refused nodes (and those refused for claiming a held client id) and discovery time."""
        d = self.directory
        return {
            "clients_registered": len(d) if d else 0,
            "nodes_refused": len(d.refused) if d else 0,
            "nodes_contested": len(d.contested) if d else 0,
            **self.timings,
        }

    # -- membership --------------------------------------------------------------------------

    def refresh(self, loop: RoundLoop) -> None:
        """Forget nodes that left and query nodes that joined since the last round."""
        directory = self._require_directory()
        nodes = set(self.grid.get_node_ids())
        known = directory.known_nodes
        gone = known - nodes
        if gone:
            directory.forget(gone)
        new = nodes - known
        if new:
            log.info("%d new nodes joined; asking who they are", len(new))
            until = time.monotonic() + loop.cfg.federation.round_timeout
            self._register(_ask(self.grid, loop.cfg, new, until, self.query_batch, self.deadline, self.poll_interval))

    # -- helpers -----------------------------------------------------------------------------

    def _require_directory(self) -> ClientDirectory:
        if self.directory is None:
            raise RuntimeError("FlowerTransport.start() must run before the first round")
        return self.directory

    def _register(self, answers: Mapping[int, ClientIdentity | str | None]) -> None:
        directory = self._require_directory()
        for node, answer in sorted(answers.items()):
            if answer is None:
                continue  # no answer in time: asked again when the next round refreshes the nodes
            if isinstance(answer, str):
                directory.refused[node] = answer
            else:
                directory.register(node, answer)
        for cid, node in directory.assign_missing():
            log.info("node %s has no client id of its own; it acts as client %d", node, cid)

    def _messages(
        self,
        loop: RoundLoop,
        book: RoundLog,
        located: dict[int, int],
        arrays: ArrayRecord,
        config: dict[str, Any],
        kind: str,
    ) -> list[Message]:
        ttl = loop.cfg.federation.round_timeout + 60.0
        messages = []
        for cid, node in sorted(located.items()):
            content = fl.instructions_content(arrays, {**loop.instructions(book.round_idx, cid), **config})
            if not book.bytes_down:
                book.bytes_down = fl.record_nbytes(content)
            messages.append(Message(content, node, kind, ttl=ttl, group_id=str(book.round_idx)))
        return messages

    def _exchange(self, loop: RoundLoop, book: RoundLog, messages: list[Message]) -> None:
        if not messages:  # e.g. an empty Poisson cohort: nothing to send, nothing to wait for
            return
        asked = {m.metadata.dst_node_id for m in messages}
        timeout = loop.cfg.federation.round_timeout
        t = time.perf_counter()
        replies = self._send_and_receive(messages, fl.TRAIN, book.round_idx, timeout)
        book.add_time("send_receive", time.perf_counter() - t)
        t = time.perf_counter()
        answered = self.collect_train(loop, book, replies)
        directory = self._require_directory()
        for node in asked - answered:
            cid = directory.client_of(node)
            if cid is not None:
                loop.fail(book, cid, f"no reply within federation.round_timeout={timeout:g}s")
        book.add_time("collect", time.perf_counter() - t)

    def _send_and_receive(self, messages: list[Message], kind: str, round_idx: int, timeout: float) -> list[Message]:
        """Push ``messages``, then pull their replies until all are in or :attr:`deadline` says stop."""
        return send_and_receive(
            self.grid, messages, kind=kind, round_idx=round_idx, timeout=timeout, deadline=self.deadline,
            poll_interval=self.poll_interval, client_of=self.directory.client_of if self.directory else None,
        )  # fmt: skip

    def collect_train(self, loop: RoundLoop, book: RoundLog, replies: Iterable[Message]) -> set[int]:
        """Decode and validate train replies into ``book``; returns the nodes that answered."""
        directory = self._require_directory()
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            cid = directory.client_of(node)
            if cid is None:
                log.warning("round %d: reply from unknown node %s ignored", book.round_idx, node)
                continue
            try:
                update, num_tasks, metrics = fl.unpack_update(reply)
            except UpdateRejected as exc:
                if reply.has_error():
                    loop.fail(book, cid, str(exc))
                else:  # undecodable: refused like an invalid update, and no longer a pending failure
                    book.rejected[cid] = str(exc)
                    book.failed.pop(cid, None)
                    log.warning("round %d: rejected the reply of client %d: %s", book.round_idx, cid, exc)
                continue
            loop.accept(book, ClientReply(cid, update, num_tasks, metrics, nbytes=fl.record_nbytes(reply.content)))
        return answered


def send_and_receive(
    grid: Grid,
    messages: Sequence[Message],
    *,
    kind: str,
    round_idx: int,
    timeout: float,
    deadline: Deadline = timeout_deadline,
    poll_interval: float | None = None,
    client_of: Callable[[int], int | None] | None = None,
) -> list[Message]:
    """Push ``messages`` and pull their replies until every reply is in or ``deadline`` says stop.

    Flower's own ``Grid.send_and_receive`` with a deadline that can be injected and a shorter
    pull interval (a deployment grid's waits 3 s between pulls).

    Args:
        grid: Flower's grid.
        messages: the messages (one per destination node).
        kind: their message type (reported to ``deadline``).
        round_idx: their round (0 for the start-up query).
        timeout: the exchange's timeout in seconds (reported to ``deadline``).
        deadline: decides after each incomplete pull whether to stop waiting.
        poll_interval: seconds between pulls (default :func:`poll_interval_of` the grid).
        client_of: maps a node id to its client id, if known (for :attr:`Waiting.pending_clients`).

    Returns:
        The replies that arrived, in arrival order.
    """
    if not messages:
        return []
    interval = poll_interval_of(grid) if poll_interval is None else poll_interval
    pushed = [mid for mid in grid.push_messages(messages) if mid]
    node_of = {m.metadata.message_id: m.metadata.dst_node_id for m in messages}
    pending = set(pushed)
    started = time.monotonic()
    replies: list[Message] = []
    while True:
        got = list(grid.pull_messages(pending))
        replies.extend(got)
        pending.difference_update(r.metadata.reply_to_message_id for r in got)
        if not pending:
            return replies
        nodes = frozenset(node_of[mid] for mid in pending if mid in node_of)
        clients = frozenset(c for c in (client_of(n) for n in nodes) if c is not None) if client_of else frozenset()
        if deadline(Waiting(kind, round_idx, nodes, clients, time.monotonic() - started, timeout)):
            return replies
        time.sleep(interval)


def ask_sites(
    grid: Grid,
    cfg: Config,
    *,
    query_batch: int = 500,
    deadline: Deadline = timeout_deadline,
    poll_interval: float | None = None,
) -> dict[int, ClientIdentity | str | None]:
    """Wait for ``federation.clients_total`` nodes (at most ``federation.join_timeout`` s) and ask each who it is.

    Args:
        grid: Flower's grid.
        cfg: the run configuration.
        query_batch: nodes asked at once.
        deadline: when the query stops waiting for missing answers (default: at
            ``federation.join_timeout``).
        poll_interval: seconds between pulls of the answers (default :func:`poll_interval_of` the grid).

    Returns:
        ``node id -> identity`` for the nodes that answered, the reason for those that answered
        with an error, and ``None`` for those that did not answer in time.
    """
    f = cfg.federation
    until = time.monotonic() + f.join_timeout
    nodes = set(grid.get_node_ids())
    while len(nodes) < f.clients_total and time.monotonic() < until:
        time.sleep(0.2)
        nodes = set(grid.get_node_ids())
    if len(nodes) < f.clients_total:
        log.warning(
            "%d of %d clients registered within federation.join_timeout=%gs; starting with them",
            len(nodes),
            f.clients_total,
            f.join_timeout,
        )
    return _ask(grid, cfg, nodes, until, query_batch, deadline, poll_interval)


def _ask(
    grid: Grid,
    cfg: Config,
    nodes: set[int],
    until: float,
    query_batch: int,
    deadline: Deadline,
    poll_interval: float | None,
) -> dict[int, ClientIdentity | str | None]:
    """The start-up query to ``nodes``, in batches, until ``until`` (monotonic seconds) or ``deadline``."""
    ordered = sorted(nodes)
    ttl = max(1.0, until - time.monotonic())
    answers: dict[int, ClientIdentity | str | None] = {}
    for start in range(0, len(ordered), query_batch):
        chunk = ordered[start : start + query_batch]
        content = fl.pack_query(cfg.federation.clients_total)
        messages = [Message(content, node, fl.QUERY, ttl=ttl + 60, group_id="query") for node in chunk]
        left = max(1.0, until - time.monotonic())
        replies = send_and_receive(
            grid, messages, kind=fl.QUERY, round_idx=0, timeout=left, deadline=deadline, poll_interval=poll_interval
        )
        for reply in replies:
            node = reply.metadata.src_node_id
            if reply.has_error():
                answers[node] = f"error {reply.error.code}: {reply.error.reason}"
                log.warning("node %s could not answer the start-up query: %s", node, reply.error.reason)
                continue
            try:
                answers[node] = fl.unpack_identity(reply)
            except UpdateRejected as exc:
                answers[node] = str(exc)
        for node in set(chunk) - set(answers):
            answers[node] = None
            log.warning("node %s did not answer the start-up query in time", node)
    return answers
