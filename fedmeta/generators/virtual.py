"""Level 2, direct: virtual tasks sampled on the server and mixed into the federated meta-update.

``generators.mode: direct`` with ``generators.depth: 2`` (SPEC §5). Every round, after the
aggregation stage (so after the privacy mechanism's noise), the server draws
``generators.tasks`` virtual tasks from the declared family (``generators.family``: range keys
over the clients' ``task.*``, e.g. a wider amplitude range), computes their meta-gradient at the
current initialization with the run's own algorithm (the same engine, objective terms and soft
constraints included), and mixes it in::

    aggregate <- (1 - λ_r) · aggregate + λ_r · g_virtual

with ``λ_r`` = ``generators.weight`` on ``generators.schedule`` (the outer-lr schedule's shapes).
The virtual tasks come from the seed and the round only and read no client data, so this is
post-processing of the released aggregate: the privacy accounting is unchanged.

Failure signatures, logged every round under ``generators`` in ``metrics.jsonl``: the ratio of the
virtual to the clients' meta-gradient norm (meta-gradient *explosion* above
``generators.max_norm_ratio``) and the spread of the virtual tasks' parameters (*collapse* at 0).
``generators.on_failure``: ``warn`` logs, ``damp`` halves ``λ`` from then on (the damping is saved
in the checkpoint), ``stop`` ends the run with :class:`GeneratorFailure` before the step.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch

from fedmeta.aggregation import global_norm
from fedmeta.errors import ConfigError, FedMetaError
from fedmeta.rng import make_generator
from fedmeta.types import Params, TaskBatch

if TYPE_CHECKING:
    from fedmeta.config import Config
    from fedmeta.experiment import Experiment
    from fedmeta.federation.stages import RoundState

__all__ = ["VirtualTaskStage", "GeneratorFailure", "check_generators", "generator_stages", "virtual_config", "MODES"]

log = logging.getLogger(__name__)

#: ``generators.mode`` values that name a generator, and every value that is built.
GENERATORS = ("direct", "adversarial")
MODES = ("none", *GENERATORS)
ON_FAILURE = ("warn", "damp", "stop")
DEVICES = ("auto", "cpu", "cuda")


class GeneratorFailure(FedMetaError):
    """A failure signature fired under ``generators.on_failure: stop``."""


def virtual_config(cfg: Config) -> Config:
    """``cfg`` with ``generators.family``'s range keys in ``task``: what virtual tasks are drawn from."""
    from fedmeta.config import with_task_ranges

    return with_task_ranges(cfg, cfg.generators.family)


def resolve_device(name: str) -> torch.device:
    """``auto``: ``cuda`` when a GPU is visible, else ``cpu``.

    Raises:
        ConfigError: for ``cuda`` on a machine without one (naming ``generators.device``).
    """
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'generators.device' is 'cuda' but no CUDA device is available (use auto or cpu)")
    return torch.device(name)


def check_generators(cfg: Config) -> None:
    """Validate ``generators.*`` (the soft constraints have :func:`~fedmeta.generators.constraints.check_constraints`).

    Raises:
        ConfigError: naming the key.
    """
    from fedmeta.config import REGRESSION_TASKS
    from fedmeta.federation.stages import OUTER_SCHEDULES

    g = cfg.generators

    def need(ok: bool, key: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"config key 'generators.{key}' {why}, got {getattr(g, key)!r}")

    need(g.mode in MODES, "mode", f"must be one of {', '.join(MODES)}")
    need(g.depth in (1, 2), "depth", "must be 1 (no generator) or 2 (a generator on the initialization; 3: not built)")
    generating = g.mode in GENERATORS
    if generating or g.depth != 1:
        need(g.depth == 2, "depth", f"must be 2 for generators.mode {g.mode!r}")
        need(generating, "mode", f"must name a generator ({', '.join(GENERATORS)}) when generators.depth is 2")
    need(0 <= g.weight <= 1 and math.isfinite(g.weight), "weight", "must be in [0, 1] (a mixing weight)")
    need(0 <= g.weight_final <= 1, "weight_final", "must be in [0, 1]")
    need(g.schedule in OUTER_SCHEDULES, "schedule", f"must be one of {', '.join(OUTER_SCHEDULES)}")
    need(g.gamma > 0, "gamma", "must be positive")
    need(all(m >= 1 for m in g.milestones), "milestones", "must be rounds (>= 1)")
    need(g.tasks >= 1, "tasks", "must be at least 1")
    need(g.on_failure in ON_FAILURE, "on_failure", f"must be one of {', '.join(ON_FAILURE)}")
    need(g.device in DEVICES, "device", f"must be one of {', '.join(DEVICES)}")
    need(g.max_norm_ratio > 0, "max_norm_ratio", "must be positive")
    if g.family.overrides():
        need(cfg.task.name in REGRESSION_TASKS, "family", "overrides the range keys of a generated family")
    if generating:
        if cfg.task.name not in REGRESSION_TASKS:
            raise ConfigError(
                f"config key 'generators.mode' {g.mode!r} samples virtual tasks from a generated family "
                f"({', '.join(REGRESSION_TASKS)}); task.name is {cfg.task.name!r}"
            )
        from fedmeta.config import check_task_ranges

        check_task_ranges(cfg, g.family, "generators.family")
    if g.mode == "adversarial":
        from fedmeta.generators.adversarial import check_adversarial

        check_adversarial(cfg)


class VirtualTaskStage:
    """The server stage that mixes the virtual-task meta-gradient into the aggregate (module docstring).

    Args:
        cfg: the run configuration.
        experiment: the run's tasks, model and algorithm (its objective terms included).
        rounds: the length of ``λ``'s schedule (the rounds the run takes).
    """

    name = "generators"

    def __init__(self, cfg: Config, experiment: Experiment, *, rounds: int) -> None:
        from fedmeta.federation.stages import OuterSchedule
        from fedmeta.tasks import build_family

        g = cfg.generators
        self.cfg = cfg
        self.algorithm = experiment.algorithm
        self.family = build_family(virtual_config(cfg))
        self.device = resolve_device(g.device)
        self.schedule = OuterSchedule(
            g.schedule, g.weight, rounds, final_lr=g.weight_final, milestones=tuple(g.milestones), gamma=g.gamma
        )
        self.damping = 1.0
        self.rounds = rounds

    def virtual_tasks(self, round_idx: int) -> TaskBatch:
        """The round's virtual tasks: a function of the seed and the round only."""
        return self.family.sample(make_generator(self.cfg.seed, "generators", round_idx), self.cfg.generators.tasks)

    def virtual_gradient(self, meta: Params, tasks: TaskBatch) -> Params:
        """The run's algorithm's mean meta-gradient on ``tasks`` at ``meta``, computed on the stage's device."""
        dev = self.device
        on = {k: v.detach().to(dev) for k, v in meta.items()}
        dtype = next(iter(on.values())).dtype
        batch = tasks if dev.type == "cpu" and tasks.support_x.dtype == dtype else tasks.to(dev, dtype)
        grads = self.algorithm.meta_gradient(on, batch).gradient
        return {k: v.to(meta[k].device) for k, v in grads.items()}

    def weight_at(self, round_idx: int) -> float:
        """``λ`` of the round: the schedule's value times the damping so far."""
        return self.schedule.lr_at(round_idx) * self.damping

    def __call__(self, state: RoundState) -> None:
        if state.aggregate is None:
            return
        tasks = self.virtual_tasks(state.round_idx)
        spread = float(tasks.params.double().std(dim=0).mean()) if tasks.params is not None else float("nan")
        info: dict[str, Any] = {"task_spread": spread}
        if self.map_due(state.round_idx) and tasks.params is not None:
            from fedmeta.generators.adversarial import post_adaptation_losses
            from fedmeta.generators.pictures import task_map

            with torch.no_grad():
                meta = {k: v.detach() for k, v in state.reference.items()}
            difficulty = post_adaptation_losses(self.algorithm, meta, tasks).detach()
            info["map"] = task_map(tasks.params, difficulty, range(tasks.num_tasks))
        self.mix(state, tasks, info, ["collapse"] if spread == 0.0 else [])

    def map_due(self, round_idx: int) -> bool:
        """Whether the round's virtual tasks go in the row for the task-space map: on evaluation rounds."""
        return round_idx % self.cfg.eval.every == 0 or round_idx == self.rounds

    def mix(self, state: RoundState, tasks: TaskBatch | None, info: dict[str, Any], failures: list[str]) -> None:
        """Mix the meta-gradient of ``tasks`` into ``state.aggregate``, acting on the failure signatures.

        Args:
            state: the round's state (its aggregate is replaced).
            tasks: the round's virtual tasks; ``None`` mixes nothing in (the weight is logged as 0).
            info: the generator's own signatures for the metrics row (``generators``).
            failures: the signatures that fired so far; meta-gradient explosion is checked here.

        Raises:
            GeneratorFailure: when a signature fired under ``generators.on_failure: stop``.
        """
        assert state.aggregate is not None
        virtual = None if tasks is None else self.virtual_gradient(state.reference, tasks)
        ratio = 0.0
        if virtual is not None:
            clients_norm, virtual_norm = global_norm(state.aggregate), global_norm(virtual)
            ratio = virtual_norm / clients_norm if clients_norm > 0 else math.inf
            if ratio > self.cfg.generators.max_norm_ratio:
                failures = ["explosion", *failures]
        info = {"norm_ratio": ratio, **info, "failures": failures}
        if failures:
            action = self.cfg.generators.on_failure
            spread = info.get("task_spread", 0.0)
            message = (
                f"round {state.round_idx}: generator failure signature {', '.join(failures)} "
                f"(virtual/clients meta-gradient norm ratio {ratio:.3g}, task spread {spread:.3g})"
            )
            if action == "stop":
                raise GeneratorFailure(message + "; generators.on_failure is 'stop'")
            if action == "damp":
                self.damping *= 0.5
                message += f"; lambda damped to x{self.damping:g}"
            log.warning(message)
        lam = self.weight_at(state.round_idx) if virtual is not None else 0.0
        info["weight"] = lam
        if virtual is not None:
            state.aggregate = {k: (1.0 - lam) * v + lam * virtual[k].to(v.dtype) for k, v in state.aggregate.items()}
        state.info["generators"] = info

    def state_dict(self) -> dict[str, Any]:
        """The damping of ``λ`` (the tasks come from the seed and the round: nothing else to keep)."""
        return {"damping": self.damping}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.damping = float(state["damping"])


def generator_stages(cfg: Config, experiment: Experiment, *, rounds: int) -> list[Any]:
    """The server stages ``generators.*`` asks for: none at depth 1 (the plain run, bit for bit)."""
    if cfg.generators.depth == 1 or cfg.generators.mode not in GENERATORS:
        return []
    if cfg.generators.mode == "adversarial":
        from fedmeta.generators.adversarial import AdversarialTaskStage

        return [AdversarialTaskStage(cfg, experiment, rounds=rounds)]
    return [VirtualTaskStage(cfg, experiment, rounds=rounds)]
