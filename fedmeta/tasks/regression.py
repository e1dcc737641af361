"""Generated regression families: MAML's sinusoid and the damped harmonic oscillator."""

from __future__ import annotations

import math
from abc import abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar, Self

import torch
from torch import Tensor

from fedmeta.registry import require
from fedmeta.tasks.base import SPLITS, TaskFamily, uniform
from fedmeta.types import TaskBatch

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = ["GeneratedRegression", "SinusoidFamily", "HarmonicFamily"]


Range = tuple[float, float]


def _check_range(key: str, value: Range | None, *, low: float | None = None) -> None:
    if value is None:
        return
    lo, hi = value
    require(lo <= hi, key, list(value), "must be [low, high] with low <= high")
    if low is not None:
        require(lo >= low, key, list(value), f"must lie at or above {low}")


class _GeneratedRegression(TaskFamily):
    """Shared machinery: task parameters -> x drawn uniformly -> y = f(x; params) + noise."""

    kind = "regression"
    models = ("mlp",)
    input_shape = (1,)
    output_dim = 1

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """The range keys of the generated families (``task.amplitude``, ``phase``, ``x_range``, ``omega``,
        ``damping``) are ``[low, high]`` (``omega`` and ``damping`` non-negative, damping below 1), and
        ``task.noise_std >= 0``.
        """
        t = cfg.task
        _check_range("task.amplitude", t.amplitude)
        _check_range("task.phase", t.phase)
        _check_range("task.x_range", t.x_range)
        _check_range("task.omega", t.omega, low=0.0)
        _check_range("task.damping", t.damping, low=0.0)
        if t.damping is not None:
            require(t.damping[1] < 1.0, "task.damping", list(t.damping), "must stay below 1 (underdamped)")
        require(t.noise_std >= 0, "task.noise_std", t.noise_std, "must be >= 0")

    #: The task parameters in order, each ``(name, default range)``: ``task.<name>`` is its range
    #: (``None`` keeps the default) and ``params[:, i]`` is drawn uniformly from it.
    RANGES: ClassVar[tuple[tuple[str, Range], ...]]
    #: the inputs' range unless ``task.x_range`` says otherwise
    DEFAULT_X_RANGE: ClassVar[Range]

    def __init__(
        self,
        *,
        shots: int,
        query: int,
        x_range: Range | None = None,
        noise_std: float = 0.0,
        **ranges: Range | None,
    ) -> None:
        """A family of ``shots + query`` points per task.

        Args:
            shots: support points per task.
            query: query points per task.
            x_range: the inputs' range (``None``: :attr:`DEFAULT_X_RANGE`).
            noise_std: standard deviation of the Gaussian noise added to ``y``.
            ranges: a range per name in :attr:`RANGES` (``None`` or absent: its default).

        Raises:
            TypeError: for a range the family does not have.
        """
        unknown = sorted(set(ranges) - {name for name, _ in self.RANGES})
        if unknown:
            raise TypeError(f"{type(self).__name__} has no range {', '.join(unknown)}")
        self.shots = shots
        self.query = query
        self.x_range = x_range or self.DEFAULT_X_RANGE
        self.noise_std = noise_std
        for name, default in self.RANGES:
            setattr(self, name, ranges.get(name) or default)

    @classmethod
    def from_config(cls, cfg: Config, *, site: str | Path | None = None) -> Self:
        """From ``task.shots``/``query``, ``x_range``, ``noise_std`` and the range keys (``None``: the defaults)."""
        t = cfg.task
        ranges = {name: getattr(t, name) for name, _ in cls.RANGES}
        return cls(shots=t.shots, query=t.query, x_range=t.x_range, noise_std=t.noise_std, **ranges)

    @property
    def param_names(self) -> tuple[str, ...]:
        """The task parameters' names, in the order of a ``params`` row."""
        return tuple(name for name, _ in self.RANGES)

    def param_ranges(self) -> list[Range]:
        """The ``[low, high]`` range of every task parameter, in :attr:`param_names` order."""
        return [getattr(self, name) for name in self.param_names]

    def sample_params(self, gen: torch.Generator, n: int, split: str) -> Tensor:
        """``[n, len(RANGES)]``: each parameter uniform in its range, drawn in the order of :attr:`RANGES`."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return torch.stack([uniform(gen, n, lo, hi) for lo, hi in self.param_ranges()], dim=1)

    @abstractmethod
    def function(self, params: Tensor, x: Tensor) -> Tensor:
        """Evaluate the noiseless target ``f(x; params)``; ``params`` is ``[T, P]``, x ``[T, N, 1]``."""

    def make_tasks(self, params: Tensor, gen: torch.Generator) -> TaskBatch:
        t = params.shape[0]
        lo, hi = self.x_range
        n = self.shots + self.query
        x = lo + (hi - lo) * torch.rand(t, n, 1, generator=gen)
        y = self.function(params, x)
        if self.noise_std > 0:
            y = y + self.noise_std * torch.randn(y.shape, generator=gen)
        return TaskBatch(
            support_x=x[:, : self.shots],
            support_y=y[:, : self.shots],
            query_x=x[:, self.shots :],
            query_y=y[:, self.shots :],
            kind=self.kind,
            params=params,
        )


#: the public name of the generated families' base (what constraint generators propose tasks of)
GeneratedRegression = _GeneratedRegression


class SinusoidFamily(_GeneratedRegression):
    """MAML's sinusoid regression (Finn et al., 2017, §5.1): ``y = A sin(x - phi)``.

    Defaults follow the paper: ``A ~ U[0.1, 5.0]``, ``phi ~ U[0, pi]``, ``x ~ U[-5, 5]``.
    Task parameters are ``[A, phi]``. Train and eval tasks come from the same distribution but
    from independent random streams, so a held-out task is never a training task.
    """

    name = "sinusoid"
    RANGES = (("amplitude", (0.1, 5.0)), ("phase", (0.0, math.pi)))
    DEFAULT_X_RANGE = (-5.0, 5.0)
    amplitude: Range
    phase: Range

    def function(self, params: Tensor, x: Tensor) -> Tensor:
        amp = params[:, 0].view(-1, 1, 1)
        phase = params[:, 1].view(-1, 1, 1)
        return amp * torch.sin(x - phase)


class HarmonicFamily(_GeneratedRegression):
    """Damped harmonic oscillator: ``y(t) = A exp(-zeta w t) sin(w_d t + phi)``, ``w_d = w sqrt(1 - zeta^2)``.

    Every task solves the ODE ``y'' + 2 zeta w y' + w^2 y = 0``, which is what makes this family
    useful for soft physical constraints (seed 000). With ``zeta = 0`` it is a pure harmonic, the
    regression family TRLearner (seed 002) uses next to sinusoids. Task parameters are
    ``[A, w, zeta, phi]``. Defaults: ``A ~ U[0.1, 5]``, ``w ~ U[0.5, 2]``, ``zeta ~ U[0, 0.2]``,
    ``phi ~ U[0, pi]``, ``t ~ U[0, 5]`` (up to 1.6 periods, decaying at most to ``e^-2``: as
    hard as MAML's sinusoid for a 40-40 MLP, with frequency and damping varying across tasks).
    """

    name = "harmonic"
    RANGES = (("amplitude", (0.1, 5.0)), ("omega", (0.5, 2.0)), ("damping", (0.0, 0.2)), ("phase", (0.0, math.pi)))
    DEFAULT_X_RANGE = (0.0, 5.0)
    amplitude: Range
    omega: Range
    damping: Range
    phase: Range

    def function(self, params: Tensor, x: Tensor) -> Tensor:
        amp, omega, zeta, phase = (params[:, i].view(-1, 1, 1) for i in range(4))
        omega_d = omega * torch.sqrt(1.0 - zeta**2)
        return amp * torch.exp(-zeta * omega * x) * torch.sin(omega_d * x + phase)

    @staticmethod
    def ode_residual(params: Tensor, y: Tensor, dy: Tensor, d2y: Tensor) -> Tensor:
        """Residual ``y'' + 2 zeta w y' + w^2 y`` of the task's ODE (zero for the true solution)."""
        omega = params[:, 1].view(-1, 1, 1)
        zeta = params[:, 2].view(-1, 1, 1)
        return d2y + 2.0 * zeta * omega * dy + omega**2 * y
