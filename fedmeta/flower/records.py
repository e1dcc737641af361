"""The records adapter between fedmeta and Flower: parameters, metrics and messages.

The Flower apps (:mod:`fedmeta.flower.client_app`, :mod:`fedmeta.flower.server_app` and the
transport in :mod:`fedmeta.flower.transport`) unpack a message with the functions here, call the
library, and pack the reply with the functions here. Importing this module imports ``flwr``: call
:func:`fedmeta.flower.env.configure_environment` before (the entry points do).

Message protocol (``RecordDict`` keys):

* ``query`` (start-up and late joiners): server → ``{"config": ConfigRecord(clients-total)}``;
  client → ``{"identity": ConfigRecord(client-id, kind, num-tasks, site)}``.
* ``train``: server → ``{"meta": ArrayRecord, "config": ConfigRecord(round, client-id, ...)}``
  (under DP also ``privacy.clip_norm``); client → ``{"update": ArrayRecord, "metrics":
  MetricRecord(num-tasks, metric means)}`` (under DP: the privatized update, a nominal num-tasks
  and ``privacy.*`` scalars only; the client's accountant stays in ``context.state`` under
  :data:`PRIVACY_STATE`).
* ``evaluate``: server → like train; client → ``{"metrics": MetricRecord(num-tasks, means)}``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

from fedmeta.algorithms import MetaUpdate
from fedmeta.errors import UpdateRejected
from fedmeta.federation.client import ClientIdentity
from fedmeta.types import Params

__all__ = [
    "QUERY",
    "TRAIN",
    "EVALUATE",
    "NUM_TASKS",
    "params_to_record",
    "record_to_params",
    "metrics_to_record",
    "record_to_metrics",
    "record_nbytes",
    "pack_query",
    "pack_identity",
    "unpack_identity",
    "pack_instructions",
    "instructions_content",
    "unpack_instructions",
    "pack_update",
    "unpack_update",
    "pack_eval_metrics",
    "unpack_eval_metrics",
    "reply_error",
    "node_settings",
    "prepare_grid",
    "PRIVACY_STATE",
    "load_node_state",
    "store_node_state",
]

log = logging.getLogger(__name__)

QUERY = "query"
TRAIN = "train"
EVALUATE = "evaluate"
#: Metric key carrying the number of tasks behind an update (the aggregation weight).
NUM_TASKS = "num-tasks"

_META, _CONFIG, _UPDATE, _METRICS, _IDENTITY = "meta", "config", "update", "metrics", "identity"


# -- records ----------------------------------------------------------------------------------


def params_to_record(params: Params) -> ArrayRecord:
    """Meta-parameters (or an update) as an ``ArrayRecord``, keys and dtypes unchanged."""
    return ArrayRecord({k: Array(v.detach().cpu().contiguous().numpy()) for k, v in params.items()})


def record_to_params(record: ArrayRecord) -> Params:
    """The inverse of :func:`params_to_record`: CPU tensors keyed like the record.

    Raises:
        UpdateRejected: if an entry cannot be read as a numeric array (a malformed reply).
    """
    out: Params = {}
    for key, array in record.items():
        try:
            value = np.asarray(array.numpy())
            out[key] = torch.from_numpy(value.copy())
        except (ValueError, TypeError) as exc:
            raise UpdateRejected(f"array '{key}' cannot be decoded: {exc}") from exc
    return out


def metrics_to_record(metrics: Mapping[str, float | int]) -> MetricRecord:
    """Scalar metrics as a ``MetricRecord`` (floats and ints only)."""
    return MetricRecord({k: (int(v) if isinstance(v, (bool, int)) else float(v)) for k, v in metrics.items()})


def record_to_metrics(record: MetricRecord) -> dict[str, float]:
    """Scalar metrics of a ``MetricRecord`` as floats (list-valued entries are skipped)."""
    return {k: float(v) for k, v in record.items() if isinstance(v, (int, float))}


def record_nbytes(content: RecordDict) -> int:
    """Serialized size in bytes of a message's content, as Flower puts it on the wire."""

    def walk(obj: Any) -> int:
        return len(obj.deflate()) + sum(walk(c) for c in (obj.children or {}).values())

    return walk(content)


# -- start-up query ---------------------------------------------------------------------------


def pack_query(clients_total: int) -> RecordDict:
    """The server's start-up query."""
    return RecordDict({_CONFIG: ConfigRecord({"clients-total": int(clients_total)})})


def pack_identity(identity: ClientIdentity) -> RecordDict:
    """A node's answer to the start-up query."""
    return RecordDict(
        {
            _IDENTITY: ConfigRecord(
                {
                    "client-id": int(identity.client_id),
                    "kind": identity.kind,
                    "num-tasks": int(identity.num_tasks),
                    "site": identity.site,
                    "input-shape": [int(d) for d in identity.input_shape],
                    "output-dim": int(identity.output_dim),
                }
            )
        }
    )


def _int(value: object) -> int:
    """``int(value)`` of a record value: a number or a numeric string.

    Raises:
        TypeError: for a list (or anything else ``int`` refuses), as ``int`` itself would.
        ValueError: for a string that is not an integer.
    """
    if isinstance(value, int | float | str | bytes):
        return int(value)
    raise TypeError("int() argument must be a string, a bytes-like object or a real number, not "
                    f"'{type(value).__name__}'")


def unpack_identity(message: Message) -> ClientIdentity:
    """Read a node's answer to the start-up query.

    Raises:
        UpdateRejected: if the reply does not hold an identity record.
    """
    try:
        rec = message.content.config_records[_IDENTITY]
        return ClientIdentity(
            client_id=_int(rec["client-id"]),
            kind=str(rec["kind"]),
            num_tasks=_int(rec["num-tasks"]),
            site=str(rec["site"]),
            input_shape=tuple(int(d) for d in rec.get("input-shape", [])),  # type: ignore[union-attr]
            output_dim=_int(rec.get("output-dim", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UpdateRejected(
            f"node {message.metadata.src_node_id} answered the start-up query without an identity: {exc}"
        ) from exc


# -- train / evaluate -------------------------------------------------------------------------


def pack_instructions(meta: Params, config: Mapping[str, Any]) -> RecordDict:
    """Train or evaluate instructions: the meta-parameters and a flat config (round, client-id, ...)."""
    return instructions_content(params_to_record(meta), config)


def instructions_content(arrays: ArrayRecord, config: Mapping[str, Any]) -> RecordDict:
    """Like :func:`pack_instructions` with the meta-parameters already packed (shared by a cohort)."""
    return RecordDict({_META: arrays, _CONFIG: ConfigRecord(dict(config))})


def unpack_instructions(message: Message) -> tuple[Params, dict[str, Any]]:
    """The meta-parameters and config of train/evaluate instructions.

    Raises:
        UpdateRejected: if the message lacks either record.
    """
    try:
        meta = record_to_params(message.content.array_records[_META])
        config = dict(message.content.config_records[_CONFIG])
    except KeyError as exc:
        raise UpdateRejected(f"instructions lack the record {exc}") from exc
    return meta, config


def pack_update(update: MetaUpdate, extra_metrics: Mapping[str, float] | None = None) -> RecordDict:
    """A client's reply to train instructions: its mean meta-update, task count and mean metrics."""
    metrics = {NUM_TASKS: int(update.num_tasks), **update.metrics, **(extra_metrics or {})}
    return RecordDict({_UPDATE: params_to_record(update.gradient), _METRICS: metrics_to_record(metrics)})


def unpack_update(message: Message) -> tuple[Params, int, dict[str, float]]:
    """The update, number of tasks and metrics of a train reply.

    Raises:
        UpdateRejected: if the reply is an error, lacks a record, or has no positive task count.
    """
    if message.has_error():
        err = message.error
        raise UpdateRejected(f"client error {err.code}: {err.reason}")
    try:
        update = record_to_params(message.content.array_records[_UPDATE])
        metrics = record_to_metrics(message.content.metric_records[_METRICS])
    except KeyError as exc:
        raise UpdateRejected(f"reply lacks the record {exc}") from exc
    tasks = metrics.pop(NUM_TASKS, 0.0)
    if not (tasks >= 1 and float(tasks).is_integer()):
        raise UpdateRejected(f"reply reports {tasks!r} tasks; a positive integer is required")
    return update, int(tasks), metrics


def pack_eval_metrics(metrics: Mapping[str, float], num_tasks: int) -> RecordDict:
    """A client's reply to evaluate instructions: aggregate metrics only."""
    return RecordDict({_METRICS: metrics_to_record({NUM_TASKS: int(num_tasks), **metrics})})


def unpack_eval_metrics(message: Message) -> tuple[dict[str, float], int]:
    """Metrics and number of tasks of an evaluate reply.

    Raises:
        UpdateRejected: for an error reply or a reply without metrics.
    """
    if message.has_error():
        raise UpdateRejected(f"client error {message.error.code}: {message.error.reason}")
    try:
        metrics = record_to_metrics(message.content.metric_records[_METRICS])
    except KeyError as exc:
        raise UpdateRejected(f"evaluate reply lacks the record {exc}") from exc
    tasks = metrics.pop(NUM_TASKS, 0.0)
    if tasks < 1 or not all(np.isfinite(v) for v in metrics.values()):
        raise UpdateRejected(f"evaluate reply has {tasks} tasks or non-finite metrics")
    return metrics, int(tasks)


def reply_error(message: Message, reason: str) -> Message:
    """An error reply (the server counts it as a failed client)."""
    from flwr.app import Error

    return Message(Error(code=0, reason=reason), reply_to=message)


# -- node settings and state ------------------------------------------------------------------


#: Key of the client's privacy state (its accountant) in ``context.state``.
PRIVACY_STATE = "fedmeta.privacy"


def load_node_state(context: Context, key: str) -> dict[str, Any] | None:
    """A flat dict kept in the node's persistent ``context.state`` under ``key`` (``None`` if absent).

    ``context.state`` persists per node across the messages of one run (simulation and
    deployment); what is stored there never leaves the node.
    """
    records = context.state.config_records
    if key not in records:
        return None
    return {k: (list(v) if isinstance(v, list) else v) for k, v in records[key].items()}


def store_node_state(context: Context, key: str, state: Mapping[str, Any]) -> None:
    """Keep ``state`` (str/int/float/bool values or same-typed lists, empty lists included) in ``context.state``."""
    context.state[key] = ConfigRecord(dict(state))


def node_settings(context: Context) -> tuple[int | None, str | None]:
    """The node's own client id and data folder from its node config.

    ``client-id`` (deployment) or Flower's ``partition-id`` (simulation) give the id;
    ``data-dir`` the site's data folder (deployment: ``--node-config "data-dir='...'"``).
    """
    cfg = context.node_config
    raw = cfg.get("client-id", cfg.get("partition-id"))
    client_id = None if raw is None or raw == "" else int(raw)
    data_dir = cfg.get("data-dir")
    return client_id, (str(data_dir) if data_dir not in (None, "") else None)


# -- grid -------------------------------------------------------------------------------------


def prepare_grid(grid: Any, *, pull_interval: float = 0.02) -> None:
    """Poll for replies more often than Flower's default 0.1 s in the in-memory (simulation) grid.

    A round of tiny sinusoid updates takes a few milliseconds of compute, so the default interval
    would dominate it. Deployment grids are left alone.
    """
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = pull_interval
