"""Fault injection for real Flower simulations: a Flower mod that makes chosen clients misbehave.

A mod wraps the real ClientApp handler (nothing is mocked): it can raise instead of calling it,
hold its reply until the test says the server has moved on (a reply that is certain to come after
the round timeout, however loaded the machine), or replace the real reply's update with NaNs.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, Context, Message, RecordDict

__all__ = ["Faults"]


@dataclass(frozen=True)
class Faults:
    """Which clients misbehave on train messages, and how.

    Attributes:
        raise_always: client ids whose handler raises every time.
        nan_reply: client ids whose update is replaced with NaN.
        slow_first_try: ``(client, round)`` pairs whose first attempt holds its reply until the
            test calls :meth:`release` for that round (once the server has closed the round
            without it: a timeout), then answers; a retry answers at once.
        fail_from_round: every client raises from this round on.
        fail_first_try_round: every client raises on its first attempt in this round and
            answers normally when retried.
        marker_dir: where first attempts and releases are recorded (shared by all Ray actors).
        hold_limit: seconds a held attempt waits for its release before it raises (a bound
            against a hang, not a timing the test relies on).
    """

    raise_always: tuple[int, ...] = ()
    nan_reply: tuple[int, ...] = ()
    slow_first_try: tuple[tuple[int, int], ...] = ()
    fail_from_round: int | None = None
    fail_first_try_round: int | None = None
    marker_dir: str = ""
    hold_limit: float = 900.0

    def release(self, rnd: int) -> None:
        """Let the held attempts of round ``rnd`` answer (call once the server has closed that round)."""
        (Path(self.marker_dir) / f"release-{rnd}").write_text("released")

    def holding(self, cid: int, rnd: int) -> bool:
        """True once the first attempt of ``(cid, rnd)`` is held (it waits for :meth:`release`)."""
        return (Path(self.marker_dir) / f"held-{cid}-{rnd}").exists()

    def __call__(self, message: Message, context: Context, call_next: Any) -> Message:
        kind = message.metadata.message_type
        if kind not in ("train", "train.cohort"):
            return call_next(message, context)
        if kind == "train.cohort" and (self.raise_always or self.nan_reply or self.slow_first_try):
            # a pooled node plays several clients in one message: only whole-node faults apply
            raise RuntimeError("per-client faults need one node per client (simulation.pool=false)")
        # a pooled node (simulation.pool) is a node of the pool: its faults fail every client it plays
        cid = int(context.node_config["partition-id"])
        rnd = int(message.content.config_records["config"]["round"])
        if self.fail_from_round is not None and rnd >= self.fail_from_round:
            raise RuntimeError(f"injected failure of client {cid} in round {rnd}")
        if rnd == self.fail_first_try_round and self._first_attempt(cid, rnd):
            raise RuntimeError(f"injected transient failure of client {cid} in round {rnd}")
        if cid in self.raise_always:
            raise RuntimeError(f"injected failure of client {cid}")
        if (cid, rnd) in self.slow_first_try and self._first_attempt(cid, rnd):
            (Path(self.marker_dir) / f"held-{cid}-{rnd}").write_text("held")
            self._hold(rnd)
        reply = call_next(message, context)
        if cid in self.nan_reply and not reply.has_error():
            update = reply.content.array_records["update"]
            poisoned = ArrayRecord({k: Array(a.numpy() * math.nan) for k, a in update.items()})
            content = RecordDict({"update": poisoned, "metrics": reply.content.metric_records["metrics"]})
            return Message(content, reply_to=message)
        return reply

    def _hold(self, rnd: int) -> None:
        released = Path(self.marker_dir) / f"release-{rnd}"
        deadline = time.monotonic() + self.hold_limit
        while not released.exists():
            if time.monotonic() > deadline:
                raise RuntimeError(f"round {rnd} was not released within {self.hold_limit:g}s")
            time.sleep(0.1)

    def _first_attempt(self, cid: int, rnd: int) -> bool:
        marker = Path(self.marker_dir) / f"{cid}-{rnd}"
        if marker.exists():
            return False
        marker.write_text("tried")
        return True
