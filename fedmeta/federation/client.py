"""What a client computes, with no Flower import: its identity, a train reply, an evaluation.

Every transport calls these: the in-process transport of the centralized reference, and the Flower
``ClientApp`` (:mod:`fedmeta.flower`) on each node. Client-side differential privacy lives in
:mod:`fedmeta.privacy.client_update`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedmeta.algorithms import MetaUpdate
from fedmeta.config import Config
from fedmeta.errors import UpdateRejected
from fedmeta.evaluation import evaluate
from fedmeta.experiment import Experiment
from fedmeta.rng import make_generator
from fedmeta.types import Params

__all__ = [
    "COMPUTE_SECONDS",
    "ClientIdentity",
    "describe_client",
    "resolve_client_id",
    "train_on_client",
    "train_cohort",
    "check_received_meta",
    "evaluate_on_client",
    "eval_cohort",
    "combine_eval_metrics",
]

#: Reply metric with the client's compute time (reported for benchmarks, never aggregated as a
#: training metric).
COMPUTE_SECONDS = "compute-seconds"


# =============================================================================================
# Client side


@dataclass(frozen=True)
class ClientIdentity:
    """What a node says about itself when the server asks at start-up.

    Attributes:
        client_id: its own client id, or -1 when it has none (the server then assigns one).
        kind: ``"regression"`` or ``"classification"``.
        num_tasks: training tasks it holds (0: it draws fresh tasks every round, or the run is
            under DP, where the count is not sent).
        site: its site name (the data folder's name; ``""`` for generated data).
        input_shape: shape of one input example.
        output_dim: model outputs its tasks need.
    """

    client_id: int
    kind: str
    num_tasks: int
    site: str
    input_shape: tuple[int, ...] = ()
    output_dim: int = 0


def describe_client(exp: Experiment, client_id: int | None, data_dir: str | None) -> ClientIdentity:
    """The identity a node reports: its id, and the shape of the data it would train on.

    For a site folder this reads (and so validates) the site's tasks. How many tasks the site
    holds is sent only without differential privacy (``PrivacyMechanism.reports_task_count``):
    under DP it is the site's data (task-level DP's adjacency protects it) and the server needs
    no count, so ``num_tasks`` is 0.
    """
    from fedmeta.privacy.mechanisms import mechanism_for

    family = exp.source.family(client_id if client_id is not None else None)
    if not mechanism_for(exp.cfg).reports_task_count:
        num_tasks = 0
    elif exp.source.num_sites is not None:  # site folders (not a class-folder tree)
        num_tasks = len(family.tasks("train"))  # type: ignore[attr-defined]
    else:
        num_tasks = exp.cfg.task.tasks_per_site or 0
    return ClientIdentity(
        client_id=-1 if client_id is None else int(client_id),
        kind=family.kind,
        num_tasks=int(num_tasks),
        site=Path(data_dir).name if data_dir else "",
        input_shape=tuple(int(d) for d in family.input_shape),
        output_dim=int(family.output_dim),
    )


def resolve_client_id(own: int | None, assigned: int | None) -> int:
    """The client id to act as: the node's own, or the one the server assigned.

    Raises:
        UpdateRejected: if the node has an id and the server addressed another one (a routing
            error that must not silently train on the wrong data), or if neither is known.
    """
    if own is not None:
        if assigned is not None and assigned != own and assigned >= 0:
            raise UpdateRejected(f"this node is client {own}, but the server addressed client {assigned}")
        return own
    if assigned is None or assigned < 0:
        raise UpdateRejected(
            "this node has no client id (node config 'client-id' or 'partition-id') and the server sent none"
        )
    return assigned


def train_on_client(exp: Experiment, meta: Params, round_idx: int, client_id: int) -> MetaUpdate:
    """What a client computes for a train instruction: exactly :meth:`Experiment.client_update`.

    The client's tasks are drawn from ``(seed, round, client_id)`` (or read from its site folder),
    used, and dropped; only the mean meta-update, the task count and mean metrics leave.

    Raises:
        UpdateRejected: if the received meta-parameters do not fit this client's model.
    """
    check_received_meta(exp, meta)
    return exp.client_update(meta, round_idx, client_id)


def train_cohort(exp: Experiment, meta: Params, round_idx: int, clients: Sequence[int]) -> list[MetaUpdate]:
    """What each client of ``clients`` computes in ``round_idx``, from one vectorized pass.

    :meth:`Experiment.round_updates` sliced per client: each client's update, task count and
    metrics are its own (its tasks drawn from ``(seed, round, client)``), as
    :func:`train_on_client` computes them one at a time. The in-process transport and a pooled
    simulation node (:mod:`fedmeta.flower.pool`) both call it.

    Returns:
        One update per client, in the order of ``clients`` (empty for no clients).

    Raises:
        UpdateRejected: if the received meta-parameters do not fit the model.
    """
    if not clients:
        return []
    check_received_meta(exp, meta)
    raw = exp.round_updates(meta, round_idx, list(clients))
    return [
        MetaUpdate({k: v[i] for k, v in raw.updates.items()}, int(raw.weights[i]), raw.client_metrics[i])
        for i in range(len(clients))
    ]


def check_received_meta(exp: Experiment, meta: Params) -> None:
    """Refuse meta-parameters that do not fit this client's model.

    Raises:
        UpdateRejected: naming the first parameter that is missing or has the wrong shape.
    """
    for key, shape in exp.model.param_shapes.items():
        if key not in meta or tuple(meta[key].shape) != tuple(shape):
            raise UpdateRejected(f"received meta-parameters do not fit the model here (parameter '{key}')")


def evaluate_on_client(
    exp: Experiment, meta: Params, client_id: int, *, num_tasks: int
) -> tuple[dict[str, float], int]:
    """Adapt to the client's own held-out tasks and return aggregate metrics only.

    Held-out tasks come from the ``eval`` split of the client's family (a site's ``heldout/``
    folder) and are the same every time for a client (drawn from ``(seed, client_id)``).

    Returns:
        Means over the client's tasks of the query loss (and accuracy) before adaptation, after
        one step and after ``eval.steps`` steps, plus the means of their squares (for a pooled
        confidence interval on the server), and the number of tasks.
    """
    family = exp.source.family(client_id)
    tasks = family.sample(make_generator(exp.cfg.seed, "client-eval", client_id), num_tasks, "eval")
    result = evaluate(exp.algorithm, meta, tasks, steps=exp.cfg.eval.steps, batch=exp.cfg.eval.batch)
    out: dict[str, float] = {}
    curves = [("loss", result.loss)] + ([("accuracy", result.accuracy)] if result.accuracy is not None else [])
    for name, curve in curves:
        c = curve.double()
        columns = {f"pre_adapt_{name}": c[:, 0], f"post_adapt_{name}_1step": c[:, 1], f"post_adapt_{name}": c[:, -1]}
        for key, col in columns.items():
            out[key] = float(col.mean())
            out[f"{key}_sq"] = float(col.pow(2).mean())
    return out, tasks.num_tasks


def eval_cohort(cfg: Config, round_idx: int) -> list[int]:
    """The clients asked for federated evaluation after ``round_idx`` (``eval.clients`` of them)."""
    n = cfg.eval.clients
    if n <= 0:
        return []
    perm = torch.randperm(cfg.federation.clients_total, generator=make_generator(cfg.seed, "eval-sample", round_idx))
    return sorted(int(c) for c in perm[:n])


def combine_eval_metrics(results: Sequence[tuple[Mapping[str, float], int]]) -> dict[str, Any]:
    """Task-weighted means of the clients' evaluation metrics, with pooled 95% intervals.

    The interval of a mean over all ``n`` tasks uses the pooled variance from the clients'
    means of squares: ``1.96 * sqrt((E[x²] − E[x]²) · n / (n − 1) / n)``.
    """
    total = sum(n for _, n in results)
    out: dict[str, Any] = {"tasks": total, "clients": len(results)}
    if total == 0:
        return out
    keys = [k for k in results[0][0] if not k.endswith("_sq")]
    for key in keys:
        mean = sum(m[key] * n for m, n in results) / total
        out[key] = mean
        sq_key = f"{key}_sq"
        if all(sq_key in m for m, _ in results) and total > 1:
            second = sum(m[sq_key] * n for m, n in results) / total
            var = max(second - mean * mean, 0.0) * total / (total - 1)
            out[f"{key}_ci95"] = 1.96 * math.sqrt(var / total)
    return out
