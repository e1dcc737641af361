"""The one adapter between fedmeta and Flower: records, messages, environment, simulation.

Everything else in :mod:`fedmeta` is Flower-free; the Flower apps in ``client/`` and ``server/``
unpack a message with the functions here, call the library, and pack the reply with the
functions here.

Importing this module sets, *before* Flower or Ray is imported, the environment every run
needs on these offline machines (each only if not already set): ``FLWR_TELEMETRY_ENABLED=0``,
``FLWR_DISABLE_UPDATE_CHECK=1``, ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (otherwise a
SuperLink runs ``uv sync`` on the app's dependencies), ``FLWR_HOME`` (``./.flwr_home`` under the
current directory: connections, installed apps and logs stay with the project instead of
``~/.flwr``) and ``RAY_TMPDIR`` (a short path under the system temp dir: Ray's socket paths
have a length limit).

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

import os
import tempfile
from pathlib import Path


def _set_environment_defaults() -> None:
    defaults = {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(Path.cwd() / ".flwr_home"),
        "RAY_TMPDIR": str(Path(tempfile.gettempdir()) / f"fedmeta-ray-{os.getuid()}"),
        # Ray would otherwise print a FutureWarning per run about accelerator env vars.
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }
    for key, value in defaults.items():
        os.environ.setdefault(key, value)


_set_environment_defaults()

import logging  # noqa: E402  (the environment above must be set before Flower and Ray load)
from collections.abc import Mapping  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402

from fedmeta.algorithms import MetaUpdate  # noqa: E402
from fedmeta.config import Config, RunOptions, config_from_run_config  # noqa: E402
from fedmeta.errors import UpdateRejected  # noqa: E402
from fedmeta.federated import ClientIdentity  # noqa: E402
from fedmeta.types import Params  # noqa: E402

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
    "run_settings",
    "prepare_grid",
    "run_flower_simulation",
    "quiet_flower_logs",
    "write_superlink_connection",
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


def unpack_identity(message: Message) -> ClientIdentity:
    """Read a node's answer to the start-up query.

    Raises:
        UpdateRejected: if the reply does not hold an identity record.
    """
    try:
        rec = message.content.config_records[_IDENTITY]
        return ClientIdentity(
            client_id=int(rec["client-id"]),
            kind=str(rec["kind"]),
            num_tasks=int(rec["num-tasks"]),
            site=str(rec["site"]),
            input_shape=tuple(int(d) for d in rec.get("input-shape", [])),  # type: ignore[union-attr]
            output_dim=int(rec.get("output-dim", 0)),  # type: ignore[arg-type]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise UpdateRejected(f"node {message.metadata.src_node_id} answered the start-up query without an identity: {exc}") from exc


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


# -- node and run settings --------------------------------------------------------------------


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


def run_settings(run_config: Mapping[str, Any], *, app_dir: Path | None = None) -> tuple[Config, RunOptions]:
    """The run's config and options from ``context.run_config`` (``flwr run``: ``[tool.flwr.app.config]``).

    Raises:
        ConfigError: if the run_config is empty (``run_simulation`` leaves it empty: the
            ``fedmeta simulate`` apps carry their config instead) or invalid.
    """
    from fedmeta.errors import ConfigError

    if not run_config:
        raise ConfigError(
            "the Flower run_config is empty: start runs with `fedmeta simulate CONFIG` or with "
            "`flwr run .` (which reads [tool.flwr.app.config] in pyproject.toml)"
        )
    return config_from_run_config(dict(run_config), base_dirs=(app_dir,) if app_dir else ())


# -- simulation -------------------------------------------------------------------------------


def prepare_grid(grid: Any, *, pull_interval: float = 0.02) -> None:
    """Poll for replies more often than Flower's default 0.1 s in the in-memory (simulation) grid.

    A round of tiny sinusoid updates takes a few milliseconds of compute, so the default interval
    would dominate it. Deployment grids are left alone.
    """
    from flwr.superlink.grid.inmemory_grid import InMemoryGrid

    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = pull_interval


def quiet_flower_logs(level: int = logging.ERROR) -> None:
    """Set Flower's logger (``flwr``) level and keep it off the root handlers (no duplicates).

    Flower logs per message at INFO and warns on every ``run_simulation`` call that it is
    deprecated; fedmeta reports what matters through its own logger.
    """
    logger = logging.getLogger("flwr")
    logger.setLevel(level)
    logger.propagate = False


def run_flower_simulation(server_app: Any, client_app: Any, *, num_supernodes: int, cpus_per_client: float = 1.0, num_cpus: int | None = None, verbose: bool = False) -> None:
    """Run a ServerApp and a ClientApp in Flower's simulation engine (Ray backend).

    Args:
        server_app: the ``ServerApp``.
        client_app: the ``ClientApp``.
        num_supernodes: virtual nodes (registered clients).
        cpus_per_client: Ray CPUs per ClientApp actor (1: one actor per core).
        num_cpus: CPUs Ray may use (default: all).
        verbose: keep Flower's INFO logs and Ray's worker output.
    """
    import warnings

    from flwr.simulation import run_simulation

    init_args: dict[str, Any] = {"include_dashboard": False, "log_to_driver": verbose}
    if num_cpus is not None:
        init_args["num_cpus"] = num_cpus
    backend = {
        "client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0},
        "init_args": init_args,
    }
    if not verbose:
        quiet_flower_logs()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes, backend_config=backend)


# -- flwr run connections ---------------------------------------------------------------------


def write_superlink_connection(
    name: str,
    address: str = ":local:",
    *,
    home: str | Path | None = None,
    insecure: bool | None = None,
    root_certificates: str | None = None,
    make_default: bool = True,
) -> Path:
    """Add (or replace) a SuperLink connection in ``$FLWR_HOME/config.toml`` for ``flwr run``.

    Flower 1.41/1.42 read ``flwr run . NAME``'s second argument from this file, never from
    pyproject.toml (where a ``[tool.flwr.federations]`` section would be moved here by Flower).

    Args:
        name: the connection name (``flwr run . NAME``).
        address: ``":local:"`` (Flower starts a local simulation SuperLink on first use, on
            ``$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, default 39091) or ``host:port`` of a running
            SuperLink.
        home: the Flower home (default: ``$FLWR_HOME``).
        insecure: connect without TLS (``host:port`` addresses).
        root_certificates: CA certificate file for TLS.
        make_default: make it the connection ``flwr run .`` uses when none is named.

    Returns:
        The config file written.
    """
    import tomllib

    import tomli_w

    root = Path(home) if home is not None else Path(os.environ["FLWR_HOME"])
    path = root / "config.toml"
    data: dict[str, Any] = {}
    if path.is_file():
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if insecure is not None:
        entry["insecure"] = insecure
    if root_certificates:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    if make_default or "default" not in links:
        links["default"] = name
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path
