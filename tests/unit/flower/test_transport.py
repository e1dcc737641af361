"""FlowerTransport's receive loop on a scripted grid: when it stops waiting, and what its deadline sees."""

from __future__ import annotations

from collections.abc import Iterable
from types import SimpleNamespace
from typing import Any

from fedmeta.flower.transport import Waiting, send_and_receive, timeout_deadline


class ScriptedGrid:
    """A grid whose nodes answer on chosen pulls (``answers_on[node] = pull index``; absent: never)."""

    def __init__(self, answers_on: dict[int, int]) -> None:
        self.answers_on = answers_on
        self.pulls = 0
        self.sent: dict[str, Any] = {}

    def push_messages(self, messages: Iterable[Any]) -> list[str]:
        ids = []
        for i, msg in enumerate(messages):
            msg.metadata.message_id = f"m{i}"  # as Flower's grids set it
            self.sent[f"m{i}"] = msg
            ids.append(f"m{i}")
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Any]:
        self.pulls += 1
        replies = []
        for mid in sorted(message_ids):
            node = self.sent[mid].metadata.dst_node_id
            if self.answers_on.get(node, -1) == self.pulls:  # only what the loop reads of a reply
                replies.append(SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=mid, src_node_id=node)))
        return replies


def _messages(nodes: list[int]) -> list[Any]:
    """What the loop reads of a message: its destination (and the id the grid gives it)."""
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=node, message_id="")) for node in nodes]


def test_returns_as_soon_as_every_reply_is_in_without_consulting_the_deadline() -> None:
    grid = ScriptedGrid({10: 1, 11: 3, 12: 2})
    asked: list[Waiting] = []

    def deadline(waiting: Waiting) -> bool:
        asked.append(waiting)
        return False

    replies = send_and_receive(
        grid, _messages([10, 11, 12]), kind="train", round_idx=3, timeout=5.0,  # type: ignore[arg-type]
        deadline=deadline, poll_interval=0.0,
    )  # fmt: skip
    assert [r.metadata.reply_to_message_id for r in replies] == ["m0", "m2", "m1"]  # arrival order
    assert grid.pulls == 3
    # consulted after each incomplete pull, with the nodes (and their clients) still missing
    assert [w.pending_nodes for w in asked] == [frozenset({11, 12}), frozenset({11})]
    assert all(w.kind == "train" and w.round_idx == 3 and w.timeout == 5.0 for w in asked)
    assert all(w.pending_clients == frozenset() for w in asked)  # no directory given


def test_an_injected_deadline_ends_the_exchange_when_only_one_client_is_missing() -> None:
    grid = ScriptedGrid({10: 1, 12: 2})  # node 11 never answers
    client_of = {10: 0, 11: 1, 12: 2}.get

    def only_client_1_missing(waiting: Waiting) -> bool:
        return waiting.pending_clients == {1}

    replies = send_and_receive(
        grid, _messages([10, 11, 12]), kind="train", round_idx=1, timeout=1e9,  # type: ignore[arg-type]
        deadline=only_client_1_missing, poll_interval=0.0, client_of=client_of,
    )  # fmt: skip
    assert {r.metadata.src_node_id for r in replies} == {10, 12}
    assert grid.pulls == 2  # stopped right after the pull that left client 1 alone, not after the timeout


def test_the_default_deadline_is_the_timeout() -> None:
    grid = ScriptedGrid({})
    replies = send_and_receive(
        grid, _messages([10]), kind="evaluate", round_idx=2, timeout=0.0, poll_interval=0.0,  # type: ignore[arg-type]
    )  # fmt: skip
    assert replies == [] and grid.pulls == 1
    assert not timeout_deadline(Waiting("train", 1, frozenset({1}), frozenset(), elapsed=9.9, timeout=10.0))
    assert timeout_deadline(Waiting("train", 1, frozenset({1}), frozenset(), elapsed=10.0, timeout=10.0))


def test_nothing_to_send_pushes_nothing() -> None:
    grid = ScriptedGrid({})
    assert send_and_receive(grid, [], kind="train", round_idx=1, timeout=1.0) == []  # type: ignore[arg-type]
    assert grid.pulls == 0 and grid.sent == {}
