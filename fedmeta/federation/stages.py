"""Server stages: what happens to a round's validated replies, as a chain of small objects.

Like torchopt's ``chain`` or Flower's strategy wrappers, each stage does one thing to the round in
flight (a :class:`RoundState`) and keeps its own state, saved under its name in the checkpoint::

    replies --[reply transforms]--> replies
            --[the policy's stages: the aggregation rule, or a privacy mechanism's chain, e.g.
               client-central's per-client clip -> fixed-denominator sum -> central noise -> mean]--> aggregate
            --[aggregate transforms: e.g. mixing in a server meta-gradient]--> aggregate
            --[the optimizer stage: server optimizer + outer-lr schedule]--> new meta-parameters

:func:`build_stages` makes the default chain of a run: the round policy contributes the middle
(:meth:`~fedmeta.federation.loop.RoundPolicy.server_stages`: the privacy mechanism's stages under
DP, see :mod:`fedmeta.privacy.stages`); a caller may insert stages before or after it (the
constraint generators mix their meta-gradient in as an aggregate stage). A stage that cannot act
on an empty cohort (no replies, or no aggregate) leaves the round as is.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch

from fedmeta.aggregation import global_norm
from fedmeta.config import Config
from fedmeta.errors import CheckpointError, ConfigError
from fedmeta.optim import ServerOptimizer
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.federation.loop import AggregateTransform, ClientReply, RoundPolicy, UpdateTransform
    from fedmeta.privacy.secure_sum import SecureSum

__all__ = [
    "RoundState",
    "Stage",
    "ReplyTransformStage",
    "AggregationStage",
    "AggregateTransformStage",
    "OptimizerStage",
    "OuterSchedule",
    "OUTER_SCHEDULES",
    "build_stages",
    "stage_states",
    "load_stage_states",
]

log = logging.getLogger(__name__)


@dataclass
class RoundState:
    """One round in flight through the stages.

    Attributes:
        round_idx: the round (1-based).
        reference: the meta-parameters the clients started from.
        replies: the validated replies, by client id order.
        aggregate: the aggregated meta-gradient (``None`` until aggregated, or for an empty cohort
            outside client-central DP).
        meta: the new meta-parameters once the optimizer stage has stepped (``None``: no step).
        info: entries stages add to the round's metrics row (e.g. ``outer_lr``).
        clip_norm: the bound a clipping stage clipped the replies to (``None``: not clipped).
        clip_factors: each reply's clip factor ``min(1, C / ||u_i||)`` (float64, aligned with
            ``replies``), set by a clipping stage and applied by the sum after it.
        denominator: set by a fixed-denominator sum: ``aggregate`` is then a sum still to be divided
            by it (noise calibrated to the sum goes in first); its mean stage divides and clears it.
        secure_sum: under secure aggregation, the unmasked sum the transport delivered (``replies``
            is then empty: the server never holds an individual update).
    """

    round_idx: int
    reference: Params
    replies: list[ClientReply]
    aggregate: Params | None = None
    meta: Params | None = None
    info: dict[str, Any] = field(default_factory=dict)
    clip_norm: float | None = None
    clip_factors: torch.Tensor | None = None
    denominator: float | None = None
    secure_sum: SecureSum | None = None


def _require_divided(state: RoundState, stage: str) -> None:
    if state.denominator is not None:
        raise ValueError(
            f"server stage {stage!r} got an undivided sum: a fixed-denominator sum needs its mean stage before it"
        )


class Stage(Protocol):
    """One server stage: a name (its key in the checkpoint), an action, and its own state."""

    name: str

    def __call__(self, state: RoundState) -> None:
        """Act on the round in flight (in place)."""
        ...

    def state_dict(self) -> dict[str, Any]:
        """The stage's state for the checkpoint (``{}``: stateless)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        ...


class _Stateless:
    name = "stateless"

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        return None


class _TransformState:
    """A transform stage's state is its transform's, when the transform keeps any.

    A transform object with ``state_dict()`` / ``load_state_dict()`` (e.g. a constraint generator
    mixing in its meta-gradient) has that state saved under the stage's name; a plain function has
    none.
    """

    transform: Any

    def state_dict(self) -> dict[str, Any]:
        save = getattr(self.transform, "state_dict", None)
        return dict(save()) if callable(save) else {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        load = getattr(self.transform, "load_state_dict", None)
        if not callable(load):
            name = getattr(self, "name", "?")
            raise CheckpointError(f"server stage {name!r} keeps no state, but the checkpoint holds some")
        load(state)


class ReplyTransformStage(_TransformState):
    """Post-process the per-client replies before aggregation (``(round, replies) -> replies``)."""

    def __init__(self, name: str, transform: UpdateTransform) -> None:
        self.name = name
        self.transform = transform

    def __call__(self, state: RoundState) -> None:
        if state.replies:
            state.replies = self.transform(state.round_idx, state.replies)


class AggregationStage(_Stateless):
    """The aggregation rule of a policy that has no stages of its own: its ``aggregate`` method.

    Without DP (:class:`~fedmeta.federation.loop.PlainPolicy`) that is ``federation.aggregation``
    weighted by task counts. An empty cohort leaves no aggregate.
    """

    name = "aggregate"

    def __init__(self, policy: RoundPolicy) -> None:
        self.policy = policy

    def __call__(self, state: RoundState) -> None:
        reports = [{"num_tasks": rep.num_tasks, **rep.metrics} for rep in state.replies]
        updates = [rep.update for rep in state.replies]
        try:
            state.aggregate = self.policy.aggregate(
                state.round_idx, updates, reference=state.reference, reports=reports
            )
        except ValueError:
            if state.replies:
                raise
            log.info("round %d: empty cohort, no update", state.round_idx)  # e.g. Poisson sampling drew nobody
            state.aggregate = None


class AggregateTransformStage(_TransformState):
    """Post-process the aggregate before the optimizer (``(round, aggregate, replies) -> aggregate``)."""

    def __init__(self, name: str, transform: AggregateTransform) -> None:
        self.name = name
        self.transform = transform

    def __call__(self, state: RoundState) -> None:
        _require_divided(state, self.name)
        if state.aggregate is not None:
            state.aggregate = self.transform(state.round_idx, state.aggregate, state.replies)


#: ``meta.outer_schedule`` names.
OUTER_SCHEDULES = ("constant", "linear", "step", "cosine")


@dataclass(frozen=True)
class OuterSchedule:
    """The server optimizer's step size in round ``r`` of ``rounds`` (``meta.outer_schedule``).

    * ``constant``: ``lr`` every round.
    * ``linear``: ``lr + (final_lr - lr) t`` with ``t = (r - 1) / rounds``: ``lr`` in round 1, and
      ``final_lr`` where the schedule would go after the last round (as torch's ``LinearLR`` and
      ``CosineAnnealingLR`` do), so the last round still takes a step even when ``final_lr`` is 0.
    * ``cosine``: ``final_lr + (lr - final_lr) (1 + cos(pi t)) / 2`` with the same ``t``.
    * ``step``: ``lr × gamma^k`` where ``k`` counts the milestones strictly before ``r`` (a
      milestone ``m`` means rounds after ``m`` take the decayed rate). Unlike the glyph benchmark's
      old two-phase decay, the optimizer's moments carry on across a milestone.

    Args:
        name: one of :data:`OUTER_SCHEDULES`.
        lr: ``meta.outer_lr``.
        rounds: the rounds the run takes (``federation.rounds``, or fewer when a privacy budget
            stops the run sooner): the schedule's length.
        final_lr: ``meta.outer_lr_final`` (linear, cosine).
        milestones: ``meta.outer_milestones`` (step).
        gamma: ``meta.outer_gamma`` (step).
    """

    name: str
    lr: float
    rounds: int
    final_lr: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    @classmethod
    def from_config(cls, cfg: Config, *, rounds: int | None = None) -> OuterSchedule:
        """The schedule of ``cfg.meta`` over ``rounds`` (default ``federation.rounds``)."""
        m = cfg.meta
        return cls(
            m.outer_schedule,
            m.outer_lr,
            cfg.federation.rounds if rounds is None else rounds,
            final_lr=m.outer_lr_final,
            milestones=tuple(int(x) for x in m.outer_milestones),
            gamma=m.outer_gamma,
        )

    def lr_at(self, round_idx: int) -> float:
        """The step size of round ``round_idx`` (1-based; rounds past the end keep the last value).

        Raises:
            ConfigError: for an unknown schedule name (names ``meta.outer_schedule``).
        """
        if self.name == "constant":
            return self.lr
        if self.name == "step":
            return self.lr * self.gamma ** sum(1 for m in self.milestones if round_idx > m)
        t = min(1.0, max(0.0, (round_idx - 1) / max(1, self.rounds)))
        if self.name == "linear":
            return self.lr + (self.final_lr - self.lr) * t
        if self.name == "cosine":
            return self.final_lr + (self.lr - self.final_lr) * (1.0 + math.cos(math.pi * t)) / 2.0
        raise ConfigError(
            f"config key 'meta.outer_schedule' is {self.name!r}; must be one of {', '.join(OUTER_SCHEDULES)}"
        )


class OptimizerStage:
    """The server optimizer (FedOpt: the aggregate is a pseudo-gradient) with its outer-lr schedule.

    Its state is the optimizer's (moments, step counts), saved in the checkpoint's optimizer entry.
    """

    name = "optimizer"

    def __init__(self, optimizer: ServerOptimizer, schedule: OuterSchedule) -> None:
        self.optimizer = optimizer
        self.schedule = schedule

    def __call__(self, state: RoundState) -> None:
        _require_divided(state, self.name)
        if state.aggregate is None:
            return
        state.info["update_norm"] = global_norm(state.aggregate)
        # set every round: a resumed run steps at its config's rate, not the one saved with the optimizer
        lr = self.schedule.lr_at(state.round_idx)
        self.optimizer.set_lr(lr)
        if self.schedule.name != "constant":
            state.info["outer_lr"] = lr
        state.meta = self.optimizer.step(state.aggregate)

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(dict(state))


def build_stages(
    cfg: Config,
    policy: RoundPolicy,
    optimizer: ServerOptimizer,
    *,
    update_transforms: Sequence[UpdateTransform] = (),
    aggregate_transforms: Sequence[AggregateTransform] = (),
    aggregate_stages: Sequence[Stage] = (),
    rounds: int | None = None,
) -> list[Stage]:
    """The default chain: reply transforms, the policy's stages, aggregate transforms, the optimizer.

    ``aggregate_stages`` are full stages placed after the aggregate transforms (they see the whole
    round, e.g. the constraint generators' virtual-task stage, which needs the reference model).

    The policy's stages are what its ``server_stages()`` returns (a privacy mechanism's chain,
    e.g. client-central's ``clip``, ``sum``, ``noise``, ``mean``); a policy without that method
    contributes one :class:`AggregationStage` around its ``aggregate``. Transforms are named
    ``replies-<i>`` / ``update-<i>`` after their position, or by their ``stage_name`` attribute
    when they have one; a transform with ``state_dict()`` /
    ``load_state_dict()`` has its state saved under that name. ``rounds`` is the outer schedule's
    length (default ``federation.rounds``).
    """

    def named(fn: Callable[..., Any], default: str) -> str:
        return str(getattr(fn, "stage_name", default))

    stages: list[Stage] = [ReplyTransformStage(named(t, f"replies-{i}"), t) for i, t in enumerate(update_transforms)]
    own = getattr(policy, "server_stages", None)
    stages += list(own()) if callable(own) else [AggregationStage(policy)]
    stages += [AggregateTransformStage(named(t, f"update-{i}"), t) for i, t in enumerate(aggregate_transforms)]
    stages += list(aggregate_stages)
    stages.append(OptimizerStage(optimizer, OuterSchedule.from_config(cfg, rounds=rounds)))
    names = [s.name for s in stages]
    if len(set(names)) != len(names):
        raise ValueError(f"server stage names must be unique, got {names}")
    return stages


def stage_states(stages: Sequence[Stage], *, skip: Sequence[str] = ()) -> dict[str, dict[str, Any]]:
    """``{name: state}`` of the stages that keep state (except ``skip``), for the checkpoint."""
    out = {}
    for stage in stages:
        if stage.name in skip:
            continue
        state = stage.state_dict()
        if state:
            out[stage.name] = state
    return out


def load_stage_states(stages: Sequence[Stage], states: Mapping[str, Mapping[str, Any]], *, path: str) -> None:
    """Restore :func:`stage_states` by name.

    Raises:
        CheckpointError: if the checkpoint holds state for a stage this run does not have (a run
            resumed with another server chain).
    """
    by_name = {s.name: s for s in stages}
    unknown = sorted(set(states) - set(by_name))
    if unknown:
        raise CheckpointError(f"checkpoint '{path}' holds state of server stages {unknown} this run does not have")
    for name, state in states.items():
        by_name[name].load_state_dict(state)
