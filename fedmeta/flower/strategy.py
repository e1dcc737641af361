"""``FedMetaStrategy``: federated meta-learning as a Flower strategy.

It follows Flower's ``Strategy`` interface (``configure_train`` / ``aggregate_train`` /
``configure_evaluate`` / ``aggregate_evaluate`` / ``summary``) and, like Flower's FedOpt family,
treats the aggregated client meta-gradients as a (pseudo-)gradient for a server optimizer that
keeps its state across rounds. The math and bookkeeping live in
:class:`fedmeta.federated.MetaServer`; this class only turns them into Flower messages.

:meth:`FedMetaStrategy.run` plays the role of ``Strategy.start`` with what a meta-training run
needs on top: a start-up query that maps client ids to Flower node ids (so that cohorts are the
seeded ``sample_clients`` draws the centralized reference uses), late joiners, resumption from a
checkpoint, retries of failed clients, and a clear stop when too few valid replies arrive.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from fedmeta.flower import records as fl
from fedmeta.errors import InconsistentReplies, UpdateRejected
from fedmeta.config import Config
from fedmeta.federated import ClientIdentity, ClientReply, MetaServer, RoundLog, eval_cohort
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["FedMetaStrategy", "ProgressFn", "ask_sites"]

log = logging.getLogger(__name__)

ProgressFn = Callable[[int, dict[str, Any]], None]


class FedMetaStrategy(Strategy):
    """Sample clients, send meta-parameters, aggregate meta-gradients, step the server optimizer.

    Args:
        server: the run's :class:`MetaServer` (state, policy, outputs).
        query_batch: nodes asked at once by the start-up query. Flower's in-memory state scans
            every stored message for every node, so smaller batches keep simulation sweeps short.
        progress: called after every round with the round number and its metrics row.
    """

    def __init__(self, server: MetaServer, *, query_batch: int = 500, progress: ProgressFn | None = None) -> None:
        self.server = server
        self.cfg = server.cfg
        self.directory = server.directory()
        self.query_batch = query_batch
        self.progress = progress
        self._book: RoundLog | None = None
        self._eval_failed = 0
        self.timings: dict[str, float] = {}

    # -- Flower's Strategy interface ---------------------------------------------------------

    def summary(self) -> None:
        """Log what this strategy will do."""
        c, f = self.cfg, self.cfg.federation
        log.info(
            "FedMetaStrategy: %s on %s, %d of %d clients per round, %d rounds, aggregation=%s, server %s lr=%g",
            c.meta.algorithm, c.task.name, f.clients_per_round, f.clients_total, f.rounds, f.aggregation,
            c.meta.outer_optimizer, c.meta.outer_lr,
        )

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Train instructions for the round's cohort (``sample_clients(seed, round)`` by default)."""
        book = self._book
        if book is None or book.round_idx != server_round:
            book = self._book = self.server.begin_round()
            if book.round_idx != server_round:
                raise ValueError(f"the server is at round {book.round_idx}, asked to configure round {server_round}")
        located, missing = self.directory.locate(book.sampled)
        book.unavailable = missing
        if missing:
            log.warning("round %d: %d sampled clients have no node: %s", server_round, len(missing), missing[:10])
        return self._messages(book, located, arrays, dict(config), fl.TRAIN)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Validate the replies, aggregate them and step the server optimizer.

        Returns:
            The new meta-parameters and the round's task-weighted training metrics.

        Raises:
            InconsistentReplies: if fewer than ``federation.min_replies`` valid replies arrived.
        """
        book = self._require_book(server_round)
        self.collect_train(book, replies)
        row = self.server.complete_round(book)
        self._book = None
        return fl.params_to_record(self.server.meta), fl.metrics_to_record(row["train"])

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        """Evaluate instructions to ``eval.clients`` clients when an evaluation is due, else none."""
        if self.cfg.eval.clients <= 0 or not self.server.eval_due(server_round):
            return []
        cohort = eval_cohort(self.cfg, server_round)
        located, missing = self.directory.locate(cohort)
        self._eval_failed = len(missing)
        per_client = max(1, math.ceil(self.cfg.eval.tasks / max(1, len(cohort))))
        book = RoundLog(server_round, cohort)
        return self._messages(book, located, arrays, {**dict(config), "eval-tasks": per_client}, fl.EVALUATE)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        """Task-weighted means of the clients' held-out metrics (aggregates only leave clients)."""
        results = []
        failed = self._eval_failed
        for reply in replies:
            try:
                results.append(fl.unpack_eval_metrics(reply))
            except UpdateRejected as exc:
                failed += 1
                log.warning("round %d: evaluation on node %s failed: %s", server_round, reply.metadata.src_node_id, exc)
        if not results:
            log.warning("round %d: no client returned evaluation metrics", server_round)
            return None
        combined = self.server.record_client_eval(server_round, results, failed)
        return fl.metrics_to_record({k: v for k, v in combined.items() if isinstance(v, (int, float))})

    # -- the run -----------------------------------------------------------------------------

    def run(self, grid: Grid, answers: Mapping[int, ClientIdentity | str | None] | None = None) -> dict[str, Any]:
        """Discover the clients, run the remaining rounds, and write the outputs.

        Args:
            grid: Flower's grid.
            answers: start-up answers already collected with :func:`ask_sites` (``None``: ask).

        Returns:
            The summary written to ``summary.json``.

        Raises:
            InconsistentReplies: if too few clients register, or a round gets too few valid
                replies even after ``federation.max_retries`` retries (the checkpoint then holds
                the last completed round).
        """
        self.summary()
        fl.prepare_grid(grid)
        t0 = time.perf_counter()
        self.discover(grid, answers)
        self.timings["discovery_seconds"] = self.timings.get("discovery_seconds", 0.0) + time.perf_counter() - t0
        self.server.start()
        f = self.cfg.federation
        arrays = fl.params_to_record(self.server.meta)
        try:
            while not self.server.finished:
                r = self.server.round + 1
                if r > 1:
                    self.refresh(grid)
                book = self._book = self.server.begin_round()
                t = time.perf_counter()
                messages = list(self.configure_train(r, arrays, ConfigRecord(), grid))
                book.add_time("configure", time.perf_counter() - t)
                self._exchange(grid, book, messages)
                while len(book.replies) < self.server.required_replies(book) and book.pending and book.retries < f.max_retries:
                    book.retries += 1
                    located, _ = self.directory.locate(book.pending)
                    log.warning("round %d: retry %d for clients %s", r, book.retries, sorted(located)[:10])
                    self._exchange(grid, book, self._messages(book, located, arrays, {}, fl.TRAIN))
                row = self.server.complete_round(book)
                self._book = None
                arrays = fl.params_to_record(self.server.meta)
                evaluate = list(self.configure_evaluate(r, arrays, ConfigRecord(), grid))
                if evaluate:
                    t = time.perf_counter()
                    replies = grid.send_and_receive(evaluate, timeout=f.round_timeout)
                    agg = self.aggregate_evaluate(r, replies)
                    row["client_eval"] = self.server.last_client_eval if agg is not None else None
                    row.setdefault("timing", {})["client_eval"] = time.perf_counter() - t
                if self.progress is not None:
                    self.progress(r, row)
        except BaseException:
            try:  # keep what the completed rounds produced; the checkpoint already holds them
                self.server.finish(self._summary_extra())
            except Exception as exc:  # noqa: BLE001 - never mask the error that stopped the run
                log.warning("could not write the summary of the stopped run: %s", exc)
            raise
        return self.server.finish(self._summary_extra())

    def _summary_extra(self) -> dict[str, Any]:
        return {"clients_registered": len(self.directory), "nodes_refused": len(self.directory.refused), **self.timings}

    def discover(self, grid: Grid, answers: Mapping[int, ClientIdentity | str | None] | None = None) -> None:
        """Wait for the nodes to register, then ask each for its identity (start-up query).

        Args:
            grid: Flower's grid.
            answers: the start-up answers when they were already collected (:func:`ask_sites`,
                for a server that needed them to build its model); ``None`` asks now.

        Raises:
            InconsistentReplies: if fewer clients than ``federation.min_replies`` answered.
        """
        f = self.cfg.federation
        if answers is None:
            answers = ask_sites(grid, self.cfg, query_batch=self.query_batch)
        self._register(answers)
        if len(self.directory) < self.cfg.min_replies:
            raise InconsistentReplies(
                f"only {len(self.directory)} clients answered the start-up query within "
                f"federation.join_timeout={f.join_timeout:g}s ({len(answers)} nodes connected, "
                f"{len(self.directory.refused)} refused: {list(self.directory.refused.values())[:3]}); "
                f"a round needs federation.min_replies={self.cfg.min_replies}"
            )
        log.info("%d clients registered (%d nodes refused)", len(self.directory), len(self.directory.refused))

    def refresh(self, grid: Grid) -> None:
        """Forget nodes that left and query nodes that joined since the last round."""
        nodes = set(grid.get_node_ids())
        known = self.directory.known_nodes
        gone = known - nodes
        if gone:
            self.directory.forget(gone)
        new = nodes - known
        if new:
            log.info("%d new nodes joined; asking who they are", len(new))
            self._query(grid, new, time.monotonic() + self.cfg.federation.round_timeout)

    # -- helpers -----------------------------------------------------------------------------

    def _query(self, grid: Grid, nodes: set[int], deadline: float) -> None:
        self._register(_ask(grid, self.cfg, nodes, deadline, self.query_batch))

    def _register(self, answers: Mapping[int, ClientIdentity | str | None]) -> None:
        for node, answer in sorted(answers.items()):
            if answer is None:
                continue  # no answer in time: asked again when the next round refreshes the nodes
            if isinstance(answer, str):
                self.directory.refused[node] = answer
            else:
                self.directory.register(node, answer)
        for cid, node in self.directory.assign_missing():
            log.info("node %s has no client id of its own; it acts as client %d", node, cid)

    def _messages(self, book: RoundLog, located: dict[int, int], arrays: ArrayRecord, config: dict[str, Any], kind: str) -> list[Message]:
        ttl = self.cfg.federation.round_timeout + 60.0
        messages = []
        for cid, node in sorted(located.items()):
            content = fl.instructions_content(arrays, {**self.server.instructions(book.round_idx, cid), **config})
            if not book.bytes_down:
                book.bytes_down = fl.record_nbytes(content)
            messages.append(Message(content, node, kind, ttl=ttl, group_id=str(book.round_idx)))
        return messages

    def _exchange(self, grid: Grid, book: RoundLog, messages: list[Message]) -> None:
        if not messages:  # e.g. an empty Poisson cohort: nothing to send, nothing to wait for
            return
        asked = {m.metadata.dst_node_id for m in messages}
        t = time.perf_counter()
        replies = list(grid.send_and_receive(messages, timeout=self.cfg.federation.round_timeout))
        book.add_time("send_receive", time.perf_counter() - t)
        t = time.perf_counter()
        answered = self.collect_train(book, replies)
        for node in asked - answered:
            cid = self.directory.client_of(node)
            if cid is not None:
                self.server.fail(book, cid, f"no reply within federation.round_timeout={self.cfg.federation.round_timeout:g}s")
        book.add_time("collect", time.perf_counter() - t)

    def collect_train(self, book: RoundLog, replies: Iterable[Message]) -> set[int]:
        """Decode and validate train replies into ``book``; returns the nodes that answered."""
        answered = set()
        for reply in replies:
            node = reply.metadata.src_node_id
            answered.add(node)
            cid = self.directory.client_of(node)
            if cid is None:
                log.warning("round %d: reply from unknown node %s ignored", book.round_idx, node)
                continue
            try:
                update, num_tasks, metrics = fl.unpack_update(reply)
            except UpdateRejected as exc:
                if reply.has_error():
                    self.server.fail(book, cid, str(exc))
                else:
                    book.rejected[cid] = str(exc)
                continue
            self.server.accept(book, ClientReply(cid, update, num_tasks, metrics, nbytes=fl.record_nbytes(reply.content)))
        return answered

    def _require_book(self, server_round: int) -> RoundLog:
        if self._book is None or self._book.round_idx != server_round:
            raise ValueError(f"aggregate_train for round {server_round} without configure_train")
        return self._book


def ask_sites(grid: Grid, cfg: Config, *, query_batch: int = 500) -> dict[int, ClientIdentity | str | None]:
    """Wait for ``federation.clients_total`` nodes (at most ``federation.join_timeout`` s) and ask each who it is.

    Returns:
        ``node id -> identity`` for the nodes that answered, the reason for those that answered
        with an error, and ``None`` for those that did not answer in time.
    """
    f = cfg.federation
    deadline = time.monotonic() + f.join_timeout
    nodes = set(grid.get_node_ids())
    while len(nodes) < f.clients_total and time.monotonic() < deadline:
        time.sleep(0.2)
        nodes = set(grid.get_node_ids())
    if len(nodes) < f.clients_total:
        log.warning("%d of %d clients registered within federation.join_timeout=%gs; starting with them", len(nodes), f.clients_total, f.join_timeout)
    return _ask(grid, cfg, nodes, deadline, query_batch)


def _ask(grid: Grid, cfg: Config, nodes: set[int], deadline: float, query_batch: int) -> dict[int, ClientIdentity | str | None]:
    """The start-up query to ``nodes``, in batches, until ``deadline`` (monotonic seconds)."""
    ordered = sorted(nodes)
    ttl = max(1.0, deadline - time.monotonic())
    answers: dict[int, ClientIdentity | str | None] = {}
    for start in range(0, len(ordered), query_batch):
        chunk = ordered[start : start + query_batch]
        content = fl.pack_query(cfg.federation.clients_total)
        messages = [Message(content, node, fl.QUERY, ttl=ttl + 60, group_id="query") for node in chunk]
        left = max(1.0, deadline - time.monotonic())
        for reply in grid.send_and_receive(messages, timeout=left):
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
