"""A pool of simulation nodes playing logical clients (``simulation.pool``), on an in-process grid.

:class:`LocalGrid` has Flower's grid interface and runs the real ``ClientApp`` on each pushed
message at once, so the pooled transport, the node's batched handler and the record adapter are
exercised end to end without Ray.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import torch
from flwr.app import Context, Error, Message, RecordDict

from fedmeta.algorithms import MetaUpdate
from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import Config, load_config
from fedmeta.errors import UpdateRejected
from fedmeta.federation import RoundLoop
from fedmeta.flower import records as fl
from fedmeta.flower.client_app import build_client_app
from fedmeta.flower.pool import (
    PooledFlowerTransport,
    check_pooling,
    pack_cohort_updates,
    pool_size,
    split_cohort,
    unpack_cohort_updates,
)
from fedmeta.outputs import read_metrics

REPO = Path(__file__).resolve().parents[3]


@pytest.fixture(autouse=True)
def _a_flower_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """Messages are created inside a Flower run (a ServerApp's process knows its run id)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 1)  # the SuperLink's node id (SUPERLINK_NODE_ID)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


class LocalGrid:
    """Flower's grid interface in this process: each node runs the ClientApp on a message when it is pushed.

    Args:
        app: the ``ClientApp``.
        nodes: how many nodes (ids 100, 101, ...; partition ids 0, 1, ...).
        fail_first: node ids whose first train message raises (the node fails once).
    """

    def __init__(self, app: Any, nodes: int, *, fail_first: Iterable[int] = ()) -> None:
        self.app = app
        self.contexts = {
            100 + i: Context(
                run_id=1,
                node_id=100 + i,
                node_config={"partition-id": i, "num-partitions": nodes},
                state=RecordDict(),
                run_config={},
            )
            for i in range(nodes)
        }
        self.fail_first = set(fail_first)
        self.replies: dict[str, Message] = {}
        self.shares: list[tuple[int, list[int]]] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid4())  # as Flower's in-memory grid does
            node = msg.metadata.dst_node_id
            if msg.metadata.message_type.startswith("train"):
                self.shares.append((node, list(msg.content.config_records["cohort"]["client-ids"])))  # type: ignore[arg-type]
            if msg.metadata.message_type.startswith("train") and node in self.fail_first:
                self.fail_first.discard(node)
                reply = Message(Error(code=0, reason="injected failure of the node"), reply_to=msg)
            else:
                reply = self.app(msg, self.contexts[node])
            self.replies[msg.metadata.message_id] = reply
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        return [self.replies.pop(mid) for mid in list(message_ids) if mid in self.replies]


def _cfg(*extra: str) -> Config:
    return load_config(
        REPO / "configs" / "sinusoid.yaml",
        [
            "federation.clients_total=1000", "federation.clients_per_round=7", "federation.rounds=3",
            "meta.tasks_per_client=2", "privacy.mode=none", "eval.tasks=20", "eval.every=3", "eval.steps=2",
            *extra,
        ],
    )  # fmt: skip


def _run_pool(cfg: Config, out: Path, grid: LocalGrid) -> tuple[dict[str, Any], PooledFlowerTransport]:
    transport = PooledFlowerTransport(grid, nodes=len(grid.contexts), poll_interval=0.0)  # type: ignore[arg-type]
    summary = RoundLoop(cfg, out, mode="simulation").run(transport)
    return summary, transport


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The centralized reference of :func:`_cfg` (``min_replies`` and ``max_retries`` do not move its numbers)."""
    out = tmp_path_factory.mktemp("reference")
    run_centralized(_cfg(), out)
    return out


def _same_run(a: Path, b: Path) -> None:
    pa, pb = load_checkpoint(a / "checkpoint.pt"), load_checkpoint(b / "checkpoint.pt")
    assert pa["round"] == pb["round"]
    for k, v in pb["meta_params"].items():
        torch.testing.assert_close(pa["meta_params"][k], v, rtol=1e-5, atol=1e-7)
    rows_a = [r for r in read_metrics(a / "metrics.jsonl") if "train" in r]
    rows_b = [r for r in read_metrics(b / "metrics.jsonl") if "train" in r]
    assert [r["round"] for r in rows_a] == [r["round"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b, strict=True):
        assert ra["tasks"] == rb["tasks"]
        for key, value in rb["train"].items():
            assert ra["train"][key] == pytest.approx(value, rel=1e-5), key


def test_split_cohort_gives_each_node_a_contiguous_nearly_equal_share() -> None:
    plan = split_cohort([9, 2, 5, 7, 1, 3, 8], [100, 101, 102])
    assert plan == {100: [1, 2, 3], 101: [5, 7], 102: [8, 9]}
    assert split_cohort([4, 1], [100, 101, 102]) == {100: [1], 101: [4]}  # no empty shares
    assert split_cohort([], [100]) == {}


def test_pool_size_is_the_config_or_one_node_per_actor() -> None:
    assert pool_size(_cfg("simulation.nodes=5"), num_cpus=2) == 5
    assert pool_size(_cfg(), num_cpus=4, cpus_per_client=1.0) == 4
    assert pool_size(_cfg(), num_cpus=4, cpus_per_client=2.0) == 2
    assert pool_size(_cfg(), num_cpus=1, cpus_per_client=2.0) == 1


def test_pooling_is_refused_where_a_node_must_stay_one_party(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedmeta.privacy.mechanisms import mechanism_for

    cfg = _cfg()
    assert check_pooling(cfg)  # generated clients, no DP: a pool
    assert not check_pooling(_cfg("simulation.pool=false"))
    folder = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, name="folder"))
    assert not check_pooling(folder)  # site folders: one node per site, never two sites' data on one node
    # a mode whose protocol treats a node as one party (secure aggregation) declares it: one node per client
    distributed = _cfg("privacy.mode=client-distributed", "federation.sampling=uniform")
    assert not mechanism_for(distributed).pools_clients and not check_pooling(distributed)
    monkeypatch.setattr(type(mechanism_for(cfg)), "pools_clients", False)
    assert not check_pooling(cfg)


def test_a_pooled_reply_carries_one_update_per_client_and_its_failures() -> None:
    updates = {
        3: MetaUpdate({"w": torch.tensor([1.0, 2.0]), "b": torch.tensor(0.5)}, 2, {"loss": 0.25}),
        8: MetaUpdate({"w": torch.tensor([3.0, 4.0]), "b": torch.tensor(-1.0)}, 5, {"loss": 1.5}),
    }
    with pytest.raises(ValueError, match="client 8 reports metrics"):  # one metric list per key for all clients
        pack_cohort_updates(updates, {}, {8: {"privacy.epsilon": 2.0}})
    content = pack_cohort_updates(updates, {5: "BudgetExhausted: spent"})
    reply = Message(content, dst_node_id=0, message_type="train.cohort")
    got, failures = unpack_cohort_updates(reply)
    assert failures == {5: "BudgetExhausted: spent"}
    assert [(u.client_id, u.num_tasks, u.metrics) for u in got] == [(3, 2, {"loss": 0.25}), (8, 5, {"loss": 1.5})]
    torch.testing.assert_close(got[1].update["w"], torch.tensor([3.0, 4.0]))
    assert got[0].update["b"].shape == ()


def test_a_malformed_pooled_reply_is_refused_as_a_whole() -> None:
    content = pack_cohort_updates({1: MetaUpdate({"w": torch.ones(2)}, 1, {})})
    content["update"] = fl.params_to_record({"w": torch.ones(3, 2)})  # three updates for one client
    with pytest.raises(UpdateRejected, match="update 'w' holds"):
        unpack_cohort_updates(Message(content, dst_node_id=0, message_type="train.cohort"))
    content = pack_cohort_updates({1: MetaUpdate({"w": torch.ones(2)}, 1, {})})
    content["metrics"] = fl.metrics_to_record({fl.NUM_TASKS: 0})
    with pytest.raises(UpdateRejected, match="num-tasks' has 0 values"):
        unpack_cohort_updates(Message(content, dst_node_id=0, message_type="train.cohort"))


def test_a_pool_of_three_nodes_plays_the_centralized_cohorts(tmp_path: Path, reference: Path) -> None:
    """1,000 registered clients, 7 per round, 3 nodes: the same seeded cohorts, tasks and result as the reference;
    no client was asked anything at start-up and none holds a node."""
    cfg = _cfg()
    grid = LocalGrid(build_client_app(cfg), nodes=3)
    summary, transport = _run_pool(cfg, tmp_path / "pool", grid)
    _same_run(tmp_path / "pool", reference)
    assert summary["federation"]["clients_registered"] == 1000 and summary["federation"]["pool_nodes"] == 3
    assert len(transport.directory or []) == 0  # no client registered one by one
    from fedmeta.sampling import sample_clients

    for r in (1, 2, 3):
        shares = [share for _, share in grid.shares[3 * (r - 1) : 3 * r]]
        assert [c for share in shares for c in share] == sample_clients(cfg.seed, r, 1000, 7)
        assert [len(s) for s in shares] == [3, 2, 2]


def test_a_node_that_fails_fails_its_clients_and_they_are_retried(tmp_path: Path, reference: Path) -> None:
    """Failures stay per logical client: node 101's first message fails its 2 clients, which the retry
    sends to the pool again; the round completes with every client, like the reference."""
    cfg = _cfg("federation.min_replies=7", "federation.max_retries=1")
    grid = LocalGrid(build_client_app(cfg), nodes=3, fail_first=[101])
    _run_pool(cfg, tmp_path / "pool", grid)
    _same_run(tmp_path / "pool", reference)
    first = next(r for r in read_metrics(tmp_path / "pool" / "metrics.jsonl") if r["round"] == 1)
    assert (first["retries"], first["replies"], first["failed"]) == (1, 7, 0)
    retried = grid.shares[3:5]
    assert [share for _, share in retried] == [[grid.shares[1][1][0]], [grid.shares[1][1][1]]]
    assert math.isfinite(first["update_norm"])


def test_federated_evaluation_on_the_pool_is_each_clients_own(tmp_path: Path) -> None:
    """``eval.clients``: each node evaluates the clients of its share on their own held-out tasks; the task-weighted
    aggregate equals the reference's, where every client evaluates in process."""
    cfg = _cfg("eval.clients=5", "federation.rounds=1", "eval.every=1")
    _run_pool(cfg, tmp_path / "pool", LocalGrid(build_client_app(cfg), nodes=2))
    run_centralized(cfg, tmp_path / "cen")
    pool = [r["client_eval"] for r in read_metrics(tmp_path / "pool" / "metrics.jsonl") if "client_eval" in r]
    cen = [r["client_eval"] for r in read_metrics(tmp_path / "cen" / "metrics.jsonl") if "client_eval" in r]
    assert len(pool) == len(cen) >= 1
    for a, b in zip(pool, cen, strict=True):
        assert (a["clients"], a["tasks"]) == (b["clients"], b["tasks"]) == (5, 20)
        for key in ("pre_adapt_loss", "post_adapt_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-6), key
