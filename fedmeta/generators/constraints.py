"""Soft constraints: differentiable penalties on the *adapted* models at collocation points (SPEC §5).

As in physics-informed networks, a constraint says what every valid task's function satisfies,
and its penalty measures how far an adapted model is from satisfying it at a grid of inputs (the
collocation points) — no labels needed. Declared in YAML under ``generators.constraints``::

    generators:
      constraints:
        - {kind: ode, weight: 1.0, points: 64}          # damped harmonic oscillator (label-free)
        - {kind: bounded, bound: 5.0, weight: 0.1}      # |y| <= 5

Kinds (``y`` the adapted model's scalar output at ``x``, the mean taken over the points):

* ``bounded`` (``bound`` ``B``): ``mean relu(|y| - B)²``;
* ``lipschitz`` (``constant`` ``L``): ``mean relu(|y'| - L)²``;
* ``periodic`` (``period`` ``P``): ``mean (y(x + P) - y(x))²``;
* ``symmetry`` (``parity`` odd | even about ``center`` ``c``): ``mean (y(c + u) ∓ y(c - u))²`` with
  ``u = x - c`` (``-`` for even, ``+`` for odd);
* ``monotone`` (``direction`` increasing | decreasing): ``mean relu(∓y')²``;
* ``ode``: the damped-oscillator residual ``y'' + 2ζω y' + ω² y``. A client's task does not tell its
  ``ω`` and ``ζ``, so the penalty fits the coefficients ``(a, b) = (2ζω, ω²)`` to the adapted model
  by least squares at the points (a 2×2 solve, differentiable) and penalizes what remains:
  ``mean (y'' + a y' + b y)²`` — zero exactly when the adapted model is *some* solution of the
  family's equation. (A constant output is the trivial solution ``b = 0``; the query loss rules it out.)

Input derivatives come from autograd on the inputs (``create_graph``, so the meta-gradient flows
through them); one backward pass yields every point's derivative because each output depends on
its own input only: models with batch statistics are refused, as are derivative constraints on a
model whose second derivative vanishes (ReLU: ``model.activation`` must be smooth). Collocation
points are a fixed, evenly spaced grid over ``x_range`` (the task family's input range unless
given), so the penalty is deterministic.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor

from fedmeta.algorithms.engine import ObjectiveTerm, TermBatch
from fedmeta.errors import ConfigError
from fedmeta.registry import Registry
from fedmeta.types import model_part

if TYPE_CHECKING:
    from fedmeta.config import Config, ConstraintConfig
    from fedmeta.models.base import FunctionalModel

__all__ = [
    "CONSTRAINTS",
    "Constraint",
    "Bounded",
    "Lipschitz",
    "Periodic",
    "Symmetry",
    "Monotone",
    "HarmonicODE",
    "ConstraintTerm",
    "collocation_points",
    "build_constraints",
]

#: A batch of functions: inputs ``[T, P, 1]`` to outputs ``[T, P, 1]`` (one function per task).
Functions = Callable[[Tensor], Tensor]

#: Constraint kinds by ``generators.constraints[i].kind``.
CONSTRAINTS: Registry[type[Constraint]] = Registry("soft constraint", key="generators.constraints[].kind")


def _derivative(y: Tensor, x: Tensor) -> Tensor:
    """``dy/dx`` point by point (each output depends on its own input only), keeping the graph."""
    (dy,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    return dy


def _slope(fn: Functions, x: Tensor) -> Tensor:
    """``y'`` of every function at the points ``x`` (differentiable in the functions' parameters)."""
    x = x.detach().requires_grad_(True)
    return _derivative(fn(x), x)


def _mean_square(values: Tensor) -> Tensor:
    """Per-task mean of squares, ``[T]``."""
    return values.pow(2).flatten(1).mean(dim=1)


def _need(spec: ConstraintConfig, key: str, where: str) -> float:
    value = getattr(spec, key)
    if value is None or not math.isfinite(value):
        raise ConfigError(f"config key '{where}.{key}' is required for kind {spec.kind!r} (a number), got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _AtLeast:
    """A kind's required number option: ``>= low``, or ``> low`` when ``strict``."""

    key: str
    low: float = 0.0
    strict: bool = False

    def check(self, spec: ConstraintConfig, where: str) -> None:
        """Raises ConfigError naming ``<where>.<key>`` if the number is missing or out of range."""
        value = _need(spec, self.key, where)
        if value <= self.low if self.strict else value < self.low:
            raise ConfigError(
                f"config key '{where}.{self.key}' must be {'>' if self.strict else '>='} {self.low:g}, "
                f"got {getattr(spec, self.key)}"
            )


@dataclass(frozen=True)
class _OneOf:
    """A kind's choice option: one of ``choices``."""

    key: str
    choices: tuple[str, ...]

    def check(self, spec: ConstraintConfig, where: str) -> None:
        """Raises ConfigError naming ``<where>.<key>`` if the value is not one of the choices."""
        value = getattr(spec, self.key)
        if value not in self.choices:
            raise ConfigError(f"config key '{where}.{self.key}' must be {' or '.join(self.choices)}, got {value!r}")


class Constraint(ABC):
    """One soft constraint: a penalty per task on a batch of functions at collocation points.

    Args:
        spec: its entry of ``generators.constraints`` (checked by :meth:`check`).
    """

    kind: ClassVar[str] = ""
    #: the order of input derivatives the penalty needs (0, 1 or 2)
    derivatives: ClassVar[int] = 0
    #: the option this kind needs beyond the common ones (checked by :meth:`check`), if any
    option: ClassVar[_AtLeast | _OneOf | None] = None

    def __init__(self, spec: ConstraintConfig) -> None:
        self.spec = spec
        self.weight = spec.weight

    @classmethod
    def check(cls, spec: ConstraintConfig, where: str) -> None:
        """Refuse a missing or bad :attr:`option` of this kind (none beyond the common ones by default).

        Raises:
            ConfigError: naming ``where`` (e.g. ``generators.constraints[0]``) and the key.
        """
        if cls.option is not None:
            cls.option.check(spec, where)

    @abstractmethod
    def penalty(self, fn: Functions, x: Tensor) -> Tensor:
        """The penalty of every function, ``[T]``, at the points ``x`` ``[T, P, 1]``."""


@CONSTRAINTS.register("bounded")
class Bounded(Constraint):
    """``mean relu(|y| - B)²``."""

    kind = "bounded"

    option = _AtLeast("bound")

    def penalty(self, fn: Functions, x: Tensor) -> Tensor:
        bound = float(self.spec.bound)  # type: ignore[arg-type]
        return torch.relu(fn(x).abs() - bound).pow(2).flatten(1).mean(dim=1)


@CONSTRAINTS.register("lipschitz")
class Lipschitz(Constraint):
    """``mean relu(|y'| - L)²``."""

    kind = "lipschitz"
    derivatives = 1

    option = _AtLeast("constant")

    def penalty(self, fn: Functions, x: Tensor) -> Tensor:
        return _mean_square(torch.relu(_slope(fn, x).abs() - float(self.spec.constant)))  # type: ignore[arg-type]


@CONSTRAINTS.register("periodic")
class Periodic(Constraint):
    """``mean (y(x + P) - y(x))²``."""

    kind = "periodic"

    option = _AtLeast("period", strict=True)

    def penalty(self, fn: Functions, x: Tensor) -> Tensor:
        period = float(self.spec.period)  # type: ignore[arg-type]
        return (fn(x + period) - fn(x)).pow(2).flatten(1).mean(dim=1)


@CONSTRAINTS.register("symmetry")
class Symmetry(Constraint):
    """Even: ``mean (y(c + u) - y(c - u))²``; odd: ``mean (y(c + u) + y(c - u))²``."""

    kind = "symmetry"

    option = _OneOf("parity", ("odd", "even"))

    def penalty(self, fn: Functions, x: Tensor) -> Tensor:
        mirrored = 2.0 * self.spec.center - x
        sign = 1.0 if self.spec.parity == "odd" else -1.0
        return (fn(x) + sign * fn(mirrored)).pow(2).flatten(1).mean(dim=1)


@CONSTRAINTS.register("monotone")
class Monotone(Constraint):
    """Increasing: ``mean relu(-y')²``; decreasing: ``mean relu(y')²``."""

    kind = "monotone"
    derivatives = 1

    option = _OneOf("direction", ("increasing", "decreasing"))

    def penalty(self, fn: Functions, x: Tensor) -> Tensor:
        sign = -1.0 if self.spec.direction == "increasing" else 1.0
        return _mean_square(torch.relu(sign * _slope(fn, x)))


@CONSTRAINTS.register("ode")
class HarmonicODE(Constraint):
    """The damped-oscillator residual with least-squares coefficients (module docstring)."""

    kind = "ode"
    derivatives = 2

    def penalty(self, fn: Functions, x: Tensor) -> Tensor:
        x = x.detach().requires_grad_(True)
        y = fn(x)
        dy = _derivative(y, x)
        d2y = _derivative(dy, x)
        design = torch.cat([dy, y], dim=-1)  # [T, P, 2]: columns y', y
        gram = design.transpose(1, 2) @ design  # [T, 2, 2]
        ridge = 1e-8 * gram.diagonal(dim1=1, dim2=2).sum(dim=1).clamp_min(1e-12)
        gram = gram + ridge.view(-1, 1, 1) * torch.eye(2, dtype=y.dtype, device=y.device)
        coef = torch.linalg.solve(gram, design.transpose(1, 2) @ (-d2y))  # [T, 2, 1]: (a, b)
        residual = d2y + design @ coef
        return residual.pow(2).flatten(1).mean(dim=1)


def collocation_points(
    x_range: tuple[float, float], points: int, *, tasks: int, dtype: torch.dtype, device: torch.device | None = None
) -> Tensor:
    """An evenly spaced grid over ``x_range``, one copy per task: ``[tasks, points, 1]``."""
    grid = torch.linspace(x_range[0], x_range[1], points, dtype=dtype, device=device)
    return grid.view(1, points, 1).expand(tasks, points, 1).clone()


def build_constraints(specs: Sequence[ConstraintConfig]) -> list[Constraint]:
    """One :class:`Constraint` per ``generators.constraints`` entry."""
    return [CONSTRAINTS.get(spec.kind)(spec) for spec in specs]


class ConstraintTerm(ObjectiveTerm):
    """The constraints as an objective term of the clients' meta-batches: ``Σ_c λ_c · mean_t penalty_c(φ_t)``.

    Separable per task (each task's penalty depends on its own adapted model only), so every
    privacy mode, task-level DP included, accepts it.

    Args:
        constraints: the constraints.
        x_ranges: each constraint's collocation range.
        points: each constraint's number of points.
    """

    name: ClassVar[str] = "constraints"
    separable_per_task: ClassVar[bool] = True

    def __init__(
        self, constraints: Sequence[Constraint], x_ranges: Sequence[tuple[float, float]], points: Sequence[int]
    ) -> None:
        self.constraints = list(constraints)
        self.x_ranges = list(x_ranges)
        self.points = list(points)

    @classmethod
    def from_config(cls, cfg: Config, *, model: FunctionalModel, kind: str) -> ConstraintTerm:
        """The term for ``generators.constraints`` (ranges default to the task family's input range)."""
        check_constraints(cfg, model=model, kind=kind)
        family_range = _family_x_range(cfg)
        specs = cfg.generators.constraints
        ranges = [tuple(s.x_range) if s.x_range is not None else family_range for s in specs]
        return cls(build_constraints(specs), ranges, [s.points for s in specs])  # type: ignore[arg-type]

    def penalties(self, batch: TermBatch) -> list[Tensor]:
        """Every constraint's per-task penalty ``[T]`` on the batch's adapted models (unweighted)."""
        assert batch.ops is not None, "constraints evaluate the adapted models: they need the batch's operations"
        ops, adapted = batch.ops, model_part(batch.adapted)
        tasks = batch.tasks.num_tasks
        dtype = batch.tasks.query_x.dtype
        out = []
        for constraint, x_range, points in zip(self.constraints, self.x_ranges, self.points):
            x = collocation_points(x_range, points, tasks=tasks, dtype=dtype, device=batch.tasks.query_x.device)
            out.append(constraint.penalty(lambda inputs: ops.forward(adapted, inputs), x))
        return out

    def loss(self, batch: TermBatch) -> Tensor:
        """``Σ_c λ_c mean_t penalty_c``."""
        total = torch.zeros((), dtype=batch.tasks.query_x.dtype)
        for constraint, values in zip(self.constraints, self.penalties(batch)):
            total = total + constraint.weight * values.mean()
        return total


def _family_x_range(cfg: Config) -> tuple[float, float] | None:
    from fedmeta.tasks import TASK_FAMILIES

    if cfg.task.x_range is not None:
        return (float(cfg.task.x_range[0]), float(cfg.task.x_range[1]))
    if cfg.task.name not in TASK_FAMILIES:
        return None
    default = getattr(TASK_FAMILIES.get(cfg.task.name), "DEFAULT_X_RANGE", None)
    return None if default is None else (float(default[0]), float(default[1]))


def check_constraints(cfg: Config, *, model: FunctionalModel | None = None, kind: str | None = None) -> None:
    """Refuse ``generators.constraints`` a run cannot serve, naming the entry and key.

    Each entry's kind-specific options; scalar regression only (the penalties read one output at
    one input); a collocation range (given, or the family's); smooth, pointwise models for
    derivative constraints.

    Raises:
        ConfigError: naming ``generators.constraints[i]`` and the key.
    """
    specs = cfg.generators.constraints
    for i, spec in enumerate(specs):
        where = f"generators.constraints[{i}]"
        if spec.kind not in CONSTRAINTS:
            raise ConfigError(f"config key '{where}.kind' must be one of {', '.join(CONSTRAINTS)}, got {spec.kind!r}")
        if not (spec.weight >= 0 and math.isfinite(spec.weight)):
            raise ConfigError(f"config key '{where}.weight' must be a number >= 0, got {spec.weight}")
        if spec.points < 2:
            raise ConfigError(f"config key '{where}.points' must be at least 2, got {spec.points}")
        if spec.x_range is not None and not spec.x_range[0] < spec.x_range[1]:
            raise ConfigError(f"config key '{where}.x_range' must be [low, high] with low < high, got {spec.x_range}")
        cls = CONSTRAINTS.get(spec.kind)
        cls.check(spec, where)
        if spec.x_range is None and _family_x_range(cfg) is None:
            raise ConfigError(
                f"config key '{where}.x_range' is required: task.name {cfg.task.name!r} has no input range to place "
                "collocation points in"
            )
        if model is not None:
            if cls.derivatives and not model.smooth:
                raise ConfigError(
                    f"config key '{where}.kind' {spec.kind!r} penalizes input derivatives, which a "
                    f"{getattr(model, 'activation', 'ReLU')} {model.name} cannot carry (its second derivative is zero "
                    "almost everywhere): set model.activation to tanh, silu or softplus"
                )
            if cls.derivatives and not model.pointwise:
                raise ConfigError(
                    f"config key '{where}.kind' {spec.kind!r} needs a model whose outputs depend on each input alone "
                    f"(model {model.name!r} uses batch statistics)"
                )
    inputs = getattr(model, "input_shape", None)
    if specs and inputs is not None and math.prod(inputs) != 1:
        raise ConfigError(
            f"config key 'generators.constraints' needs scalar inputs; the model takes inputs of shape {tuple(inputs)}"
        )
    if specs and kind not in (None, "regression"):
        raise ConfigError(
            f"config key 'generators.constraints' applies to regression tasks with scalar inputs; task.name "
            f"{cfg.task.name!r} is {kind}"
        )
