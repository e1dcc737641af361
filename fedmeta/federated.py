"""The federated meta-learning logic behind the Flower apps, with no Flower import.

Client side: what a node computes for a train or evaluate instruction (:func:`train_on_client`,
:func:`evaluate_on_client`) and what it says about itself at start-up (:func:`describe_client`).

Server side:

* :class:`ClientDirectory` maps client ids (what cohorts are drawn over) to Flower node ids
  (random, known only once a node has answered the start-up query), so that the cohort of round
  ``r`` is exactly ``sample_clients(seed, r, ...)`` — the one the centralized reference uses.
* :class:`MetaServer` owns the server's state (meta-parameters, server optimizer, round) and one
  round's math: validate each reply (wrong keys/shapes, NaN/Inf are rejected and counted, never
  aggregated), post-process the per-client updates (``update_transforms``), aggregate through the
  :class:`RoundPolicy`, post-process the aggregate (``aggregate_transforms``), step the server
  optimizer, evaluate, log ``metrics.jsonl``, checkpoint atomically, and write ``summary.json``.

Differential privacy (issue 5) plugs in through the policy (cohort sampling, the extra train
instructions, the aggregation, per-round accounting, the accountant state in the checkpoint —
:class:`fedmeta.privacy.facade.ServerPrivacy` has exactly this interface) and through the two
transform lists.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch

from fedmeta.aggregation import global_norm, stack, validate_update
from fedmeta.algorithms import MetaUpdate
from fedmeta.checkpoint import check_compatible, load_checkpoint, save_checkpoint
from fedmeta.config import Config, to_dict
from fedmeta.errors import CheckpointError, ConfigError, UpdateRejected
from fedmeta.evaluation import evaluate
from fedmeta.experiment import Experiment, RoundResult, build_summary
from fedmeta.outputs import RunRecorder
from fedmeta.rng import make_generator
from fedmeta.tasks.base import TaskFamily
from fedmeta.types import Params, TaskBatch

__all__ = [
    "ClientIdentity",
    "ClientReply",
    "ClientDirectory",
    "RoundPolicy",
    "PlainPolicy",
    "default_policy",
    "MetaServer",
    "RoundLog",
    "UpdateTransform",
    "AggregateTransform",
    "describe_client",
    "resolve_client_id",
    "train_on_client",
    "check_received_meta",
    "evaluate_on_client",
    "eval_cohort",
    "combine_eval_metrics",
    "needs_site_layout",
    "site_layout",
    "SiteLayoutFamily",
    "COMPUTE_SECONDS",
]

log = logging.getLogger(__name__)

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
        num_tasks: training tasks it holds (0: it draws fresh tasks every round).
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

    For a site folder this reads (and so validates) the site's tasks.
    """
    family = exp.source.family(client_id if client_id is not None else None)
    if exp.cfg.task.name == "folder":
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
        raise UpdateRejected("this node has no client id (node config 'client-id' or 'partition-id') and the server sent none")
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


def check_received_meta(exp: Experiment, meta: Params) -> None:
    """Refuse meta-parameters that do not fit this client's model.

    Raises:
        UpdateRejected: naming the first parameter that is missing or has the wrong shape.
    """
    for key, shape in exp.model.param_shapes.items():
        if key not in meta or tuple(meta[key].shape) != tuple(shape):
            raise UpdateRejected(f"received meta-parameters do not fit the model here (parameter '{key}')")


def evaluate_on_client(exp: Experiment, meta: Params, client_id: int, *, num_tasks: int) -> tuple[dict[str, float], int]:
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


# =============================================================================================
# Server side


@dataclass(frozen=True)
class ClientReply:
    """One client's decoded train reply."""

    client_id: int
    update: Params
    num_tasks: int
    metrics: dict[str, float]
    nbytes: int = 0


class ClientDirectory:
    """Which Flower node hosts which client id.

    Flower gives nodes random ids; a client's id (simulation: its partition id; deployment: the
    site's ``client-id``) is known only on the node. Every node answers a start-up query with
    its :class:`ClientIdentity`; nodes without an id get the free ids in order of site name.

    Args:
        clients_total: ids range over ``0 .. clients_total-1``.
        kind: the task kind the server's model was built for (sites of another kind are refused).
        input_shape: the model's input shape (``None``: not checked).
        output_dim: the model's outputs (``None``: not checked).
    """

    def __init__(self, clients_total: int, *, kind: str, input_shape: tuple[int, ...] | None = None, output_dim: int | None = None) -> None:
        self.clients_total = clients_total
        self.kind = kind
        self.input_shape = input_shape
        self.output_dim = output_dim
        self._node_of: dict[int, int] = {}
        self._client_of: dict[int, int] = {}
        self._unassigned: dict[int, ClientIdentity] = {}
        self.refused: dict[int, str] = {}
        self.identities: dict[int, ClientIdentity] = {}

    def __len__(self) -> int:
        return len(self._node_of)

    @property
    def known_nodes(self) -> set[int]:
        """Nodes that answered (registered, waiting for an id, or refused)."""
        return set(self._client_of) | set(self._unassigned) | set(self.refused)

    def register(self, node_id: int, identity: ClientIdentity) -> str | None:
        """Record a node's answer. Returns why it was refused, or ``None``.

        A node claiming an id another node holds replaces it (a site that came back with a new
        node id); ids outside ``0 .. clients_total-1`` and mismatched data are refused.
        """
        problem = self._check(identity)
        if problem is not None:
            self.refused[node_id] = problem
            log.warning("node %s refused: %s", node_id, problem)
            return problem
        self.identities[node_id] = identity
        if identity.client_id < 0:
            self._unassigned[node_id] = identity
            return None
        self._bind(identity.client_id, node_id)
        return None

    def _check(self, identity: ClientIdentity) -> str | None:
        if identity.kind != self.kind:
            return f"its tasks are {identity.kind}, the model is for {self.kind} tasks"
        if identity.client_id >= self.clients_total:
            return f"client id {identity.client_id} is outside 0..{self.clients_total - 1} (federation.clients_total)"
        if self.input_shape is not None and identity.input_shape and tuple(identity.input_shape) != tuple(self.input_shape):
            return f"its inputs have shape {tuple(identity.input_shape)}, the model expects {tuple(self.input_shape)}"
        if self.output_dim is not None and identity.output_dim and identity.output_dim != self.output_dim:
            return f"its tasks need {identity.output_dim} outputs, the model has {self.output_dim}"
        return None

    def _bind(self, client_id: int, node_id: int) -> None:
        old = self._node_of.get(client_id)
        if old is not None and old != node_id:
            log.info("client %d moved from node %s to node %s", client_id, old, node_id)
            self._client_of.pop(old, None)
        self._node_of[client_id] = node_id
        self._client_of[node_id] = client_id

    def assign_missing(self) -> list[tuple[int, int]]:
        """Give nodes without an id the free ids, in order of (site name, node id).

        Returns:
            ``(client_id, node_id)`` pairs assigned; nodes left over when ids run out stay idle.
        """
        free = (c for c in range(self.clients_total) if c not in self._node_of)
        done = []
        for node_id, ident in sorted(self._unassigned.items(), key=lambda kv: (kv[1].site, kv[0])):
            cid = next(free, None)
            if cid is None:
                log.warning("no free client id left for node %s (site %r)", node_id, ident.site)
                continue
            self._bind(cid, node_id)
            done.append((cid, node_id))
            del self._unassigned[node_id]
        return done

    def forget(self, node_ids: set[int]) -> None:
        """Drop nodes that left (their clients become unavailable until they answer again)."""
        for node_id in node_ids:
            cid = self._client_of.pop(node_id, None)
            if cid is not None and self._node_of.get(cid) == node_id:
                del self._node_of[cid]
            self._unassigned.pop(node_id, None)
            self.refused.pop(node_id, None)
            self.identities.pop(node_id, None)

    def locate(self, client_ids: Sequence[int]) -> tuple[dict[int, int], list[int]]:
        """Node of each client, and the clients with no node (unavailable)."""
        found, missing = {}, []
        for cid in client_ids:
            node = self._node_of.get(int(cid))
            if node is None:
                missing.append(int(cid))
            else:
                found[int(cid)] = node
        return found, missing

    def client_of(self, node_id: int) -> int | None:
        """The client id a node acts as."""
        return self._client_of.get(node_id)


def needs_site_layout(cfg: Config) -> bool:
    """True when the server holds no site data and must learn the data's shapes from the sites.

    That is a deployment of on-disk sites (``task.name: folder``) whose server config leaves
    ``task.data_dir`` null: every SuperNode reads its own ``data-dir``, and the model's input
    shape, output size and task kind come from the sites' answers to the start-up query.
    """
    return cfg.task.name == "folder" and not cfg.task.data_dir


class SiteLayoutFamily(TaskFamily):
    """The sites' data as their start-up answers describe it: kind and shapes, but no tasks.

    A server without site data builds its model from this family (the architecture comes from
    the config, the input shape and outputs from the sites); asking it for tasks is an error.
    """

    def __init__(self, kind: str, input_shape: Sequence[int], output_dim: int) -> None:
        self.kind = kind
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_dim = int(output_dim)

    def _no_tasks(self) -> ConfigError:
        return ConfigError(
            "this server holds no task data (task.name 'folder' with task.data_dir null): it evaluates through "
            "the sites (eval.clients > 0); for server-side evaluation point task.data_dir at a site folder with heldout/ tasks"
        )

    def sample_params(self, gen: torch.Generator, n: int, split: str) -> torch.Tensor:
        raise self._no_tasks()

    def make_tasks(self, params: torch.Tensor, gen: torch.Generator) -> TaskBatch:
        raise self._no_tasks()


def site_layout(identities: Sequence[ClientIdentity]) -> SiteLayoutFamily:
    """The data layout (kind, input shape, outputs) that most sites report.

    Ties go to the layout of the lowest client id (then site name), so the choice does not depend
    on the order of the answers. Sites with another layout are refused afterwards by the
    :class:`ClientDirectory` built for the resulting model.

    Raises:
        InconsistentReplies: if no site described its data.
    """
    from fedmeta.errors import InconsistentReplies

    described = [i for i in identities if i.input_shape and i.output_dim > 0]
    if not described:
        raise InconsistentReplies(
            "no site described its data in the start-up query, so the server cannot build the model "
            "(task.data_dir is null on the server: the model's shapes come from the sites)"
        )
    votes: dict[tuple[str, tuple[int, ...], int], list[tuple[int, str]]] = {}
    for ident in described:
        key = (ident.kind, tuple(ident.input_shape), int(ident.output_dim))
        rank = ident.client_id if ident.client_id >= 0 else 1 << 62
        votes.setdefault(key, []).append((rank, ident.site))
    # most sites first; among equals, the layout of the lowest (client id, site name)
    (kind, shape, outputs), _ = min(votes.items(), key=lambda kv: (-len(kv[1]), min(kv[1])))
    if len(votes) > 1:
        log.warning("sites report %d different data layouts; the model follows the most common one: %s %s -> %d", len(votes), kind, shape, outputs)
    return SiteLayoutFamily(kind, shape, outputs)


class RoundPolicy(Protocol):
    """What a round may delegate: cohort, extra instructions, aggregation, accounting.

    The default is :class:`PlainPolicy`; :class:`fedmeta.privacy.facade.ServerPrivacy` (issue 5)
    implements the same methods to add clipping, noise and accounting.
    """

    def rounds_to_run(self) -> int:
        """Rounds the run may take (``federation.rounds``, or fewer under a privacy budget).

        Raises:
            BudgetExhausted: if the run must not start.
        """
        ...

    def sample_clients(self, round_idx: int) -> list[int]:
        """Client ids of the round's cohort."""
        ...

    def client_config(self, round_idx: int) -> dict[str, float]:
        """Extra scalars for the round's train instructions."""
        ...

    def aggregate(self, round_idx: int, updates: Sequence[Params], *, reference: Params, reports: Sequence[Mapping[str, Any]] | None = None) -> Params:
        """The round's aggregate of validated updates (aligned with ``reports``)."""
        ...

    def finish_round(self, round_idx: int, *, sampled: Sequence[int], reports: Mapping[int, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        """Per-round bookkeeping after aggregation (the ``privacy`` entry of a metrics row)."""
        ...

    def summary(self) -> dict[str, Any] | None:
        """The ``privacy`` entry of ``summary.json`` (``None``: no DP)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """State saved in the checkpoint's accountant slot."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


class PlainPolicy:
    """No privacy: the config's cohort sampling and aggregation, weighted by tasks.

    Exactly what the centralized reference does (:meth:`Experiment.sample_round`,
    :meth:`Experiment.aggregate`), so that both paths agree.
    """

    def __init__(self, exp: Experiment) -> None:
        self.exp = exp

    def rounds_to_run(self) -> int:
        return self.exp.cfg.federation.rounds

    def sample_clients(self, round_idx: int) -> list[int]:
        return self.exp.sample_round(round_idx)

    def client_config(self, round_idx: int) -> dict[str, float]:
        return {}

    def aggregate(self, round_idx: int, updates: Sequence[Params], *, reference: Params, reports: Sequence[Mapping[str, Any]] | None = None) -> Params:
        if not updates:
            raise ValueError(f"round {round_idx}: no updates to aggregate")
        weights = torch.tensor([float((r or {}).get("num_tasks", 1)) for r in (reports or [{}] * len(updates))], dtype=torch.float64)
        return self.exp.aggregate(RoundResult([], stack(list(updates)), weights, {}))

    def finish_round(self, round_idx: int, *, sampled: Sequence[int], reports: Mapping[int, Mapping[str, Any]] | None = None) -> dict[str, Any]:
        return {}

    def summary(self) -> dict[str, Any] | None:
        return None

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


def default_policy(exp: Experiment) -> RoundPolicy:
    """The round policy of ``exp.cfg``: :class:`ServerPrivacy` under DP, :class:`PlainPolicy` without."""
    if exp.cfg.privacy.mode == "none":
        return PlainPolicy(exp)
    from fedmeta.privacy.facade import ServerPrivacy

    return ServerPrivacy(exp.cfg)


#: ``(round, replies) -> replies``: post-processing of per-client updates before aggregation
#: (e.g. clipping). Must keep keys and shapes.
UpdateTransform = Callable[[int, list[ClientReply]], list[ClientReply]]
#: ``(round, aggregate, replies) -> aggregate``: post-processing before the optimizer step
#: (e.g. server-side noise, mixing in a server-computed meta-gradient).
AggregateTransform = Callable[[int, Params, list[ClientReply]], Params]


@dataclass
class RoundLog:
    """Bookkeeping of one round: who was asked, who answered, what was refused, and timings."""

    round_idx: int
    sampled: list[int]
    replies: dict[int, ClientReply] = field(default_factory=dict)
    failed: dict[int, str] = field(default_factory=dict)
    rejected: dict[int, str] = field(default_factory=dict)
    unavailable: list[int] = field(default_factory=list)
    retries: int = 0
    bytes_down: int = 0
    timings: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.perf_counter)

    def add_time(self, name: str, seconds: float) -> None:
        """Accumulate ``seconds`` under ``name``."""
        self.timings[name] = self.timings.get(name, 0.0) + seconds

    @property
    def pending(self) -> list[int]:
        """Sampled clients that failed (errors, timeouts) and may be asked again."""
        return sorted(self.failed)


class MetaServer:
    """The server's state and per-round math for a federated meta-learning run.

    Args:
        cfg: the run configuration.
        out_dir: output directory (metrics.jsonl, summary.json, checkpoint.pt, plots).
        mode: ``summary.json``'s ``mode`` (``"simulation"``, ``"deployment"``, ...).
        resume: continue from ``out_dir/checkpoint.pt`` at the next round, with the same
            meta-parameters, optimizer state, policy (accountant) state and round.
        experiment: a prebuilt :class:`Experiment` for ``cfg``.
        policy: cohort/aggregation/accounting policy (default: :func:`default_policy`, i.e.
            :class:`~fedmeta.privacy.facade.ServerPrivacy` for a DP config, else :class:`PlainPolicy`).
        update_transforms: applied, in order, to the validated per-client updates.
        aggregate_transforms: applied, in order, to the aggregate before the optimizer step.

    Raises:
        CheckpointError: if ``resume`` is set and the checkpoint is missing or incompatible.
        BudgetExhausted: if the privacy budget refuses the run (``policy.rounds_to_run``).
    """

    def __init__(
        self,
        cfg: Config,
        out_dir: str | Path,
        *,
        mode: str = "simulation",
        resume: bool = False,
        experiment: Experiment | None = None,
        policy: RoundPolicy | None = None,
        update_transforms: Sequence[UpdateTransform] = (),
        aggregate_transforms: Sequence[AggregateTransform] = (),
    ) -> None:
        self.started = time.perf_counter()
        self.cfg = cfg
        self.mode = mode
        self.exp = experiment or Experiment(cfg)
        self.policy: RoundPolicy = policy or default_policy(self.exp)
        # the privacy budget may refuse the run or cut it short (privacy.on_budget: stop)
        self.rounds_limit = int(self.policy.rounds_to_run())
        self.update_transforms = list(update_transforms)
        self.aggregate_transforms = list(aggregate_transforms)
        self.out_dir = Path(out_dir)
        self.meta = self.exp.initial_meta_params()
        self.optimizer = self.exp.server_optimizer(self.meta)
        self.round = 0
        self.totals = {"failed": 0, "rejected": 0, "unavailable": 0, "bytes_down": 0, "bytes_up": 0, "retries": 0}
        self.extra: dict[str, Any] = {}
        if resume:
            self._load(self.out_dir / "checkpoint.pt")
        self.recorder = RunRecorder(self.out_dir, resume_round=self.round if resume else None)
        self._eval_tasks = self.exp.source.eval_tasks() if cfg.eval.server else None
        self.final_eval: dict[str, Any] | None = None
        self.last_client_eval: dict[str, Any] | None = None

    # -- state -----------------------------------------------------------------------------

    def _load(self, path: Path) -> None:
        state = load_checkpoint(path)
        check_compatible(state, self.exp.model.param_shapes, path=path, task_kind=self.exp.kind)
        if set(state["meta_params"]) != set(self.meta):
            raise CheckpointError(f"checkpoint '{path}' was written by a different algorithm")
        self.meta = {k: v.to(self.meta[k].dtype) for k, v in state["meta_params"].items()}
        self.optimizer = self.exp.server_optimizer(self.meta)
        if state.get("optimizer"):
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("accountant"):
            self.policy.load_state_dict(state["accountant"])
        self.round = int(state["round"])
        self.totals.update((state.get("extra") or {}).get("totals", {}))
        log.info("resuming from %s at round %d", path, self.round + 1)

    def checkpoint(self) -> Path:
        """Write ``checkpoint.pt`` atomically (meta-parameters, optimizer, policy state, round)."""
        return save_checkpoint(
            self.recorder.checkpoint_path,
            meta_params=self.meta,
            round_idx=self.round,
            config=to_dict(self.cfg),
            model=self.exp.model.describe(),
            task_kind=self.exp.kind,
            optimizer=self.optimizer.state_dict(),
            accountant=self.policy.state_dict() or None,
            extra={"totals": dict(self.totals), "mode": self.mode},
        )

    @property
    def finished(self) -> bool:
        """True once ``federation.rounds`` rounds (or the rounds the privacy budget allows) are done."""
        return self.round >= self.rounds_limit

    def directory(self) -> ClientDirectory:
        """An empty :class:`ClientDirectory` that checks sites against this server's model."""
        family = self.exp.source.family(None)
        return ClientDirectory(
            self.cfg.federation.clients_total,
            kind=self.exp.kind,
            input_shape=tuple(family.input_shape),
            output_dim=int(family.output_dim),
        )

    # -- a round ---------------------------------------------------------------------------

    def start(self) -> None:
        """Log the round-0 evaluation of a fresh run (like the centralized reference)."""
        if self.round == 0 and self._eval_tasks is not None:
            self.recorder.log_round({"round": 0, "eval": self.evaluate()})

    def begin_round(self) -> RoundLog:
        """Sample the next round's cohort."""
        r = self.round + 1
        return RoundLog(r, [int(c) for c in self.policy.sample_clients(r)])

    def instructions(self, round_idx: int, client_id: int) -> dict[str, Any]:
        """The flat config sent with a train instruction."""
        return {"round": int(round_idx), "client-id": int(client_id), **self.policy.client_config(round_idx)}

    def required_replies(self, book: RoundLog) -> int:
        """Valid replies the round needs: ``min_replies`` per ``clients_per_round`` sampled.

        With uniform sampling the cohort always has ``clients_per_round`` clients and this is
        ``min_replies``. A Poisson cohort varies in size (and may be empty): the minimum scales
        with the cohort actually drawn, ``ceil(min_replies × |cohort| / clients_per_round)``, so a
        small cohort is not aborted for missing its nominal size, and an empty one needs no reply
        (under client-central DP it releases pure noise, as DP-FedAvg does).
        """
        n = len(book.sampled)
        f = self.cfg.federation
        if n == f.clients_per_round:
            return min(self.cfg.min_replies, n)
        return min(n, math.ceil(self.cfg.min_replies * n / f.clients_per_round))

    def accept(self, book: RoundLog, reply: ClientReply) -> bool:
        """Validate a decoded reply and file it as a reply or a rejection.

        Returns:
            ``True`` if it will be aggregated.
        """
        cid = reply.client_id
        if cid not in book.sampled:
            book.rejected[cid] = "not in this round's cohort"
            return False
        try:
            validate_update(reply.update, self.meta, source=f"client {cid}")
            bad = [k for k, v in reply.metrics.items() if not math.isfinite(v)]
            if bad:
                raise UpdateRejected(f"update from client {cid}: metric '{bad[0]}' is not finite")
        except UpdateRejected as exc:
            book.rejected[cid] = str(exc)
            book.failed.pop(cid, None)
            log.warning("round %d: rejected %s", book.round_idx, exc)
            return False
        book.replies[cid] = reply
        book.failed.pop(cid, None)
        return True

    def fail(self, book: RoundLog, client_id: int, reason: str) -> None:
        """Record a client that raised, timed out or could not be decoded."""
        if client_id in book.replies or client_id in book.rejected:
            return
        book.failed[client_id] = reason
        log.warning("round %d: client %d failed: %s", book.round_idx, client_id, reason)

    def complete_round(self, book: RoundLog) -> dict[str, Any]:
        """Aggregate the round's valid replies, step the optimizer, evaluate, log and checkpoint.

        Returns:
            The metrics row written to ``metrics.jsonl``.

        Raises:
            InconsistentReplies: if fewer than the required valid replies arrived.
        """
        from fedmeta.errors import InconsistentReplies

        r = book.round_idx
        need = self.required_replies(book)
        replies = [book.replies[c] for c in sorted(book.replies)]
        if len(replies) < need:
            raise InconsistentReplies(
                f"round {r}: only {len(replies)} valid replies from {len(book.sampled)} sampled clients "
                f"(needed {need}, federation.min_replies={self.cfg.min_replies}); failed: {_brief(book.failed)}; "
                f"rejected: {_brief(book.rejected)}; unavailable: {book.unavailable[:10]}. "
                f"The checkpoint in {self.out_dir} holds round {self.round}; fix the clients and resume"
            )
        t0 = time.perf_counter()
        update_norm = None
        if replies:
            for transform in self.update_transforms:
                replies = transform(r, replies)
        reports = [{"num_tasks": rep.num_tasks, **rep.metrics} for rep in replies]
        aggregate: Params | None = None
        try:
            aggregate = self.policy.aggregate(r, [rep.update for rep in replies], reference=self.meta, reports=reports)
        except ValueError:
            if replies:
                raise
            log.info("round %d: empty cohort, no update", r)  # e.g. Poisson sampling drew nobody
        if aggregate is not None:
            for transform in self.aggregate_transforms:
                aggregate = transform(r, aggregate, replies)
            update_norm = global_norm(aggregate)
            self.meta = self.optimizer.step(aggregate)
        book.add_time("aggregate", time.perf_counter() - t0)
        self.round = r
        privacy = self.policy.finish_round(r, sampled=book.sampled, reports={rep.client_id: rep.metrics for rep in replies})
        row = self._row(book, replies, update_norm)
        if privacy:
            row["privacy"] = privacy
        if self.eval_due(r) and self._eval_tasks is not None:
            t0 = time.perf_counter()
            self.final_eval = row["eval"] = self.evaluate()
            book.add_time("server_eval", time.perf_counter() - t0)
        t0 = time.perf_counter()
        self.checkpoint()
        book.add_time("checkpoint", time.perf_counter() - t0)
        row["timing"] = {k: round(v, 6) for k, v in book.timings.items()}
        row["seconds"] = time.perf_counter() - book.started
        self.recorder.log_round(row)
        return row

    def _row(self, book: RoundLog, replies: list[ClientReply], update_norm: float | None) -> dict[str, Any]:
        tasks = sum(rep.num_tasks for rep in replies)
        train: dict[str, float] = {}
        if replies:
            for key in replies[0].metrics:
                # privacy.* reports (a site's epsilon, noisy clip bits) go to the privacy entry
                if key == COMPUTE_SECONDS or key.startswith("privacy.") or any(key not in rep.metrics for rep in replies):
                    continue
                train[key] = sum(rep.metrics[key] * rep.num_tasks for rep in replies) / tasks
        up = [rep.nbytes for rep in replies]
        compute = [rep.metrics.get(COMPUTE_SECONDS) for rep in replies]
        if any(c is not None for c in compute):
            book.timings["client_compute_sum"] = float(sum(c or 0.0 for c in compute))
        self.totals["failed"] += len(book.failed)
        self.totals["rejected"] += len(book.rejected)
        self.totals["unavailable"] += len(book.unavailable)
        self.totals["retries"] += book.retries
        self.totals["bytes_down"] += book.bytes_down * (len(book.sampled) - len(book.unavailable))
        self.totals["bytes_up"] += sum(up)
        return {
            "round": book.round_idx,
            "clients": len(book.sampled),
            "replies": len(replies),
            "failed": len(book.failed),
            "rejected": len(book.rejected),
            "unavailable": len(book.unavailable),
            "retries": book.retries,
            "tasks": tasks,
            "train": train,
            "update_norm": update_norm,
            "bytes": {
                "down_per_client": book.bytes_down,
                "up_per_client": (sum(up) / len(up)) if up else 0,
                "round_total": book.bytes_down * (len(book.sampled) - len(book.unavailable)) + sum(up),
            },
        }

    # -- evaluation ------------------------------------------------------------------------

    def eval_due(self, round_idx: int) -> bool:
        """Evaluate after every ``eval.every`` rounds and after the last one (of the budget, too)."""
        return round_idx % self.cfg.eval.every == 0 or round_idx in (self.cfg.federation.rounds, self.rounds_limit)

    def evaluate(self) -> dict[str, Any]:
        """Server-side evaluation on the held-out tasks (``eval.tasks``), like the reference."""
        if self._eval_tasks is None:
            raise ConfigError("eval.server is false: this server has no held-out tasks to evaluate on")
        return evaluate(self.exp.algorithm, self.meta, self._eval_tasks, steps=self.cfg.eval.steps, batch=self.cfg.eval.batch).summary()

    def record_client_eval(self, round_idx: int, results: Sequence[tuple[Mapping[str, float], int]], failed: int) -> dict[str, Any]:
        """Combine a federated evaluation and add it to the last metrics row's record."""
        combined = combine_eval_metrics(results)
        combined["failed"] = failed
        self.last_client_eval = combined
        self.recorder.log_round({"round": round_idx, "client_eval": combined})
        return combined

    # -- the end ---------------------------------------------------------------------------

    def finish(self, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Write plots and ``summary.json``; return the summary."""
        final = self.final_eval
        if final is None and self._eval_tasks is not None:
            final = self.final_eval = self.evaluate()
        if final is None:
            final = dict(self.last_client_eval or {})
            final["source"] = "clients"
            final["steps"] = self.cfg.eval.steps
        curves = {k: v for k, v in final.items() if k.endswith("_curve")}
        try:
            self.recorder.plot(curves)
            if self.exp.kind == "classification" and self._eval_tasks is not None:
                from fedmeta.outputs import EPISODE_PNG, write_episode_montage

                # a held-out episode with the adapted model's predictions, as the reference writes
                write_episode_montage(
                    self.exp.algorithm, self.meta, self._eval_tasks.slice(0, 1), self.out_dir / EPISODE_PNG,
                    steps=self.cfg.eval.steps, caption="held-out ",
                )
        except Exception as exc:  # noqa: BLE001 - a plotting failure must not lose the summary
            log.warning("could not write plots: %s", exc)
        summary = build_summary(
            self.cfg,
            mode=self.mode,
            rounds_completed=self.round,
            final=final,
            privacy=self.policy.summary(),
            wall_seconds=time.perf_counter() - self.started,
            extra={"federation": {"totals": dict(self.totals), **self.extra, **dict(extra or {})}},
        )
        self.recorder.write_summary(summary)
        return summary


def _brief(reasons: Mapping[int, str], limit: int = 3) -> str:
    if not reasons:
        return "none"
    items = [f"client {c}: {why}" for c, why in sorted(reasons.items())[:limit]]
    more = len(reasons) - limit
    return "; ".join(items) + (f"; and {more} more" if more > 0 else "")
