"""Fault injection: hostile clients on any transport, for robustness benchmarks and chaos tests.

:class:`HostileClients` wraps a :class:`~fedmeta.federation.transport.Transport`. Every round it
picks ``count`` clients of the cohort (seeded by ``(seed, round)``) and passes each of their
replies through a :data:`ReplyFault` before the round loop validates it, exactly where a hostile
client's message would enter the server. Nothing else changes: the loop validates, bounds
(task counts), aggregates and logs the faulty replies as it would any other, so what a fault
does to a run is what the product does with such a client. ``simulations/bench_hostile.py``
measures every aggregation rule against every fault in :data:`FAULTS`::

    loop = RoundLoop(cfg, out_dir, mode="centralized", server_eval=True)
    loop.run(HostileClients(InProcessTransport(), make_fault("sign_flip"), count=2, seed=cfg.seed))

The faults (``make_fault(name, **options)``):

* ``scaled``: the honest update times ``factor`` (100).
* ``sign_flip``: minus the honest update.
* ``random``: Gaussian noise with ``norm_factor`` (10) times the honest update's norm.
* ``nan``: every value NaN (the loop rejects it).
* ``stale``: the update the client (or, if it sent none then, another honest client) sent ``lag``
  (10) rounds earlier, computed on the model of that round; the honest update until then.
* ``claim_tasks``: the honest update claiming ``tasks`` (10^6) tasks, i.e. that much weight.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import torch

from fedmeta.aggregation import global_norm
from fedmeta.registry import Registry
from fedmeta.rng import make_generator
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.federation.loop import ClientReply, RoundLog, RoundLoop
    from fedmeta.federation.transport import Transport

__all__ = ["FaultContext", "ReplyFault", "FAULTS", "make_fault", "HostileClients"]


@dataclass
class FaultContext:
    """What a fault may use besides the honest reply.

    Attributes:
        round_idx: the round (1-based).
        generator: this round's and client's random stream (seeded by ``(seed, round, client)``).
        past: honest updates received in earlier rounds, ``{round: {client: update}}`` (the last
            rounds a ``stale`` fault needs; empty for the others).
    """

    round_idx: int
    generator: torch.Generator
    past: Mapping[int, Mapping[int, Params]] = field(default_factory=dict)


#: ``(honest reply, context) -> the reply the hostile client sends``.
ReplyFault = Callable[["ClientReply", FaultContext], "ClientReply"]

#: Fault factories by name: ``FAULTS.get(name)(**options)`` is a :data:`ReplyFault` (see :func:`make_fault`).
FAULTS = Registry[Callable[..., ReplyFault]]("fault", key="fault")


def make_fault(name: str, **options: Any) -> ReplyFault:
    """The fault ``name`` of :data:`FAULTS` with its options.

    Raises:
        ConfigError: for an unknown name (the known names listed).
    """
    return FAULTS.get(name)(**options)


def _with_update(reply: ClientReply, update: Params) -> ClientReply:
    return replace(reply, update=update)


@FAULTS.register("scaled")
def scaled(factor: float = 100.0) -> ReplyFault:
    """The honest update times ``factor``."""
    return lambda reply, ctx: _with_update(reply, {k: v * factor for k, v in reply.update.items()})


@FAULTS.register("sign_flip")
def sign_flip() -> ReplyFault:
    """Minus the honest update."""
    return lambda reply, ctx: _with_update(reply, {k: -v for k, v in reply.update.items()})


@FAULTS.register("random")
def random_update(norm_factor: float = 10.0) -> ReplyFault:
    """Gaussian noise scaled to ``norm_factor`` times the honest update's norm."""

    def fault(reply: ClientReply, ctx: FaultContext) -> ClientReply:
        noise = {k: torch.randn(v.shape, generator=ctx.generator, dtype=v.dtype) for k, v in reply.update.items()}
        scale = norm_factor * global_norm(reply.update) / max(global_norm(noise), 1e-300)
        return _with_update(reply, {k: v * scale for k, v in noise.items()})

    return fault


@FAULTS.register("nan")
def nan_update() -> ReplyFault:
    """Every value NaN."""
    return lambda reply, ctx: _with_update(reply, {k: torch.full_like(v, math.nan) for k, v in reply.update.items()})


@FAULTS.register("stale")
def stale(lag: int = 10) -> ReplyFault:
    """The update sent ``lag`` rounds earlier (the client's own if it sent one, else another honest one's)."""
    if lag < 1:
        raise ValueError(f"stale fault: lag must be at least 1, got {lag}")

    def fault(reply: ClientReply, ctx: FaultContext) -> ClientReply:
        then = ctx.past.get(ctx.round_idx - lag)
        if not then:
            return reply
        old = then.get(reply.client_id, then[min(then)])
        return _with_update(reply, {k: v.clone() for k, v in old.items()})

    fault.lag = lag  # type: ignore[attr-defined]
    return fault


@FAULTS.register("claim_tasks")
def claim_tasks(tasks: int = 10**6) -> ReplyFault:
    """The honest update, claiming ``tasks`` tasks (its weight in a weighted rule)."""
    return lambda reply, ctx: replace(reply, num_tasks=int(tasks))


class _Intercepting:
    """The loop as the inner transport sees it: every attribute the loop's, ``accept`` filtered."""

    def __init__(self, loop: RoundLoop, filter_reply: Callable[[RoundLog, ClientReply], ClientReply]) -> None:
        self._loop = loop
        self._filter = filter_reply

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loop, name)

    def accept(self, book: RoundLog, reply: ClientReply) -> bool:
        return self._loop.accept(book, self._filter(book, reply))


@dataclass(eq=False)
class HostileClients:
    """A transport whose replies from ``count`` clients per round pass through ``fault``.

    Args:
        inner: the transport that talks to the clients (in-process, Flower, ...).
        fault: what a hostile client does to its honest reply (:func:`make_fault`).
        count: hostile clients per round (at most the cohort).
        seed: seeds which clients are hostile in each round and the faults' random streams.
        hostile: instead of a seeded draw, the hostile clients of a round: ``(round, cohort) -> ids``.

    Raises:
        ValueError: if ``count`` is negative.
    """

    inner: Transport
    fault: ReplyFault
    count: int = field(kw_only=True)
    seed: int = field(default=0, kw_only=True)
    hostile: Callable[[int, Sequence[int]], Sequence[int]] | None = field(default=None, kw_only=True)
    #: rounds a stale fault looks back (the fault's ``lag``, 0 for the others)
    lag: int = field(init=False)
    #: honest updates of the last ``lag`` rounds, for a stale fault
    past: dict[int, dict[int, Params]] = field(init=False, default_factory=dict)
    #: ``{round: hostile client ids}`` of the rounds run so far (what a benchmark reports)
    chosen: dict[int, list[int]] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        if self.count < 0:
            raise ValueError(f"count of hostile clients must be non-negative, got {self.count}")
        self.lag = int(getattr(self.fault, "lag", 0))

    def hostile_clients(self, round_idx: int, cohort: Sequence[int]) -> list[int]:
        """The hostile clients of ``round_idx`` among ``cohort`` (seeded; the same on every rerun)."""
        if self.hostile is not None:
            return sorted(int(c) for c in self.hostile(round_idx, cohort))
        order = torch.randperm(len(cohort), generator=make_generator(self.seed, "hostile", round_idx))
        return sorted(int(cohort[int(i)]) for i in order[: min(self.count, len(cohort))])

    def start(self, loop: RoundLoop) -> None:
        """Start the inner transport."""
        self.inner.start(loop)

    def train(self, loop: RoundLoop, book: RoundLog) -> None:
        """The inner transport's round, with the hostile clients' replies passed through the fault."""
        r = book.round_idx
        hostile = set(self.hostile_clients(r, book.sampled))
        self.chosen[r] = sorted(hostile)
        honest: dict[int, Params] = {}

        def filter_reply(book: RoundLog, reply: ClientReply) -> ClientReply:
            if reply.client_id not in hostile:
                if self.lag:
                    honest[reply.client_id] = {k: v.detach().clone() for k, v in reply.update.items()}
                return reply
            ctx = FaultContext(r, make_generator(self.seed, "fault", r, reply.client_id), self.past)
            return self.fault(reply, ctx)

        self.inner.train(cast("RoundLoop", _Intercepting(loop, filter_reply)), book)
        if self.lag:
            if honest:
                self.past[r] = honest
            for old in [k for k in self.past if k <= r - self.lag]:  # the next round needs r + 1 - lag on
                del self.past[old]

    def evaluate(
        self, loop: RoundLoop, round_idx: int, cohort: Sequence[int], *, tasks_per_client: int
    ) -> tuple[list[tuple[Mapping[str, float], int]], int]:
        """The inner transport's federated evaluation (faults apply to training replies only)."""
        return self.inner.evaluate(loop, round_idx, cohort, tasks_per_client=tasks_per_client)

    def state_dict(self) -> dict[str, Any]:
        """The inner transport's state (the fault's history is not checkpointed)."""
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the inner transport's state."""
        self.inner.load_state_dict(state)

    def summary_extra(self) -> dict[str, Any]:
        """The inner transport's entries, plus how many replies were made hostile."""
        return {**self.inner.summary_extra(), "hostile_replies": sum(len(v) for v in self.chosen.values())}
