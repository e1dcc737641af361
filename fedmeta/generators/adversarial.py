"""Level 2, adversarial: a task generator that proposes the tasks the current initialization adapts worst to.

``generators.mode: adversarial`` with ``generators.depth: 2`` (SPEC §5, seed 000). The stage is the
direct stage (:class:`~fedmeta.generators.virtual.VirtualTaskStage`: mixing after the privacy
mechanism, ``λ`` schedule, failure signatures, device) with another source of virtual tasks:

1. **Generator** ``G_φ``: a small MLP from noise ``z ~ N(0, I)`` to task parameters squashed into the
   declared box (``generators.family``'s ranges: the same prior the direct arm samples uniformly).
   Every round it takes ``generators.adversarial.steps`` Adam ascent steps on

       mean_τ L_post(θ; τ)  +  diversity · mean_τ d_nn(τ)  -  penalty · mean_τ Σ_c w_c p_c(f_τ)
                            +  discriminator · mean_τ log D_ψ(s(τ))

   where ``L_post`` is the query loss after the run's own inner loop from the current initialization
   ``θ`` (second order through the support targets, so ``∂L_post/∂φ`` is exact), ``d_nn`` the distance
   of a proposal to its nearest neighbour among the proposals in the box normalized to ``[0, 1]``
   (against collapse onto one hardest task), ``p_c`` the declared soft constraints evaluated on the
   proposed task's own function (they keep the proposals on the valid task manifold), and ``D_ψ``
   the optional discriminator.
2. **Discriminator** ``D_ψ`` (only when ``generators.adversarial.discriminator > 0``): an MLP on a
   task's *shape* -- its function at the collocation grid divided by its largest magnitude -- trained
   each round to tell the clients' declared family (public config ``task.*``) from the proposals.
   It pulls proposals towards the clients' manifold, so it also limits extrapolation; off by default.
3. **Filter**: of ``candidates`` fresh proposals, a task is admitted when it is *hard* -- its
   post-adaptation loss at least ``min_gap`` times the mean over as many tasks of the clients'
   declared family -- and *novel* -- at normalized task-space distance ``>= min_distance`` from every
   task in the filter's memory (the last ``memory`` admitted tasks) and from the tasks admitted before
   it this round. The hardest admitted tasks, up to ``generators.tasks``, give the virtual meta-gradient.
   A round that admits none mixes nothing in.

What the generator is told: the family's form (its simulator ``f(x; params)``), the box of
``generators.family``, the declared constraints, the clients' declared family ``task.*`` (public
config, for the difficulty reference and the discriminator) and the released initialization -- no
client data, so like the direct stage this is post-processing: ε is unchanged.

Failure signatures (besides the direct stage's explosion ratio): *collapse* when a round admits
nothing or its admitted tasks have no spread, *manifold drift* when the proposals' mean constraint
violation exceeds ``generators.adversarial.max_drift`` (and the discriminator's mean realism score,
when there is one, is reported). The generator, the discriminator, their optimizers and the filter's
memory are checkpointed; the round's random draws come from the seed and the round, so a resumed
run is identical to an uninterrupted one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from fedmeta.algorithms.base import stack_for_tasks
from fedmeta.errors import ConfigError
from fedmeta.generators.constraints import collocation_points
from fedmeta.generators.pictures import task_map
from fedmeta.rng import make_generator
from fedmeta.tasks.regression import GeneratedRegression
from fedmeta.types import Params, TaskBatch

if TYPE_CHECKING:
    from fedmeta.config import Config
    from fedmeta.experiment import Experiment
    from fedmeta.federation.stages import RoundState
    from fedmeta.generators.constraints import Constraint

__all__ = ["AdversarialTaskStage", "TaskGenerator", "check_adversarial", "post_adaptation_losses"]

#: points of the grid a discriminator reads a task's shape at
SHAPE_POINTS = 32


def check_adversarial(cfg: Config) -> None:
    """Validate ``generators.adversarial.*``.

    Raises:
        ConfigError: naming the key.
    """
    a = cfg.generators.adversarial
    rules: list[tuple[str, bool, str]] = [
        ("candidates", a.candidates >= 2, "must be at least 2"),
        ("steps", a.steps >= 0, "must be >= 0"),
        ("lr", a.lr > 0 and math.isfinite(a.lr), "must be a positive number"),
        ("hidden", a.hidden >= 1, "must be at least 1"),
        ("noise_dim", a.noise_dim >= _task_parameters(cfg), "must be at least the number of task parameters"),
        ("diversity", a.diversity >= 0 and math.isfinite(a.diversity), "must be >= 0"),
        ("penalty", a.penalty >= 0 and math.isfinite(a.penalty), "must be >= 0"),
        ("discriminator", a.discriminator >= 0 and math.isfinite(a.discriminator), "must be >= 0"),
        ("discriminator_lr", a.discriminator_lr > 0 and math.isfinite(a.discriminator_lr), "must be positive"),
        ("min_gap", a.min_gap >= 0 and math.isfinite(a.min_gap), "must be >= 0"),
        ("min_distance", 0 <= a.min_distance <= 1, "must be in [0, 1] (a distance in the normalized box)"),
        ("memory", a.memory >= 0, "must be >= 0"),
        ("max_drift", a.max_drift > 0, "must be positive"),
    ]
    for key, ok, why in rules:
        if not ok:
            raise ConfigError(f"config key 'generators.adversarial.{key}' {why}, got {getattr(a, key)!r}")


def _task_parameters(cfg: Config) -> int:
    """How many parameters a task of the virtual family has (what the generator proposes)."""
    from fedmeta.generators.virtual import virtual_config
    from fedmeta.tasks import build_family

    family = build_family(virtual_config(cfg))
    return len(family.param_ranges()) if isinstance(family, GeneratedRegression) else 0


def post_adaptation_losses(algorithm: Any, meta: Params, tasks: TaskBatch) -> Tensor:
    """Each task's query loss after the algorithm's inner loop from ``meta``, ``[T]``.

    Second order through the support set, so the losses are differentiable with respect to the
    tasks' targets (and through them the task parameters); ``meta`` itself is not differentiated.
    """
    stacked = stack_for_tasks(meta, tasks.num_tasks)
    with torch.enable_grad():
        adapted, _ = algorithm.adapt_tasks(stacked, tasks.support_x, tasks.support_y, algorithm.inner_steps)
        return algorithm.losses_tasks(adapted, tasks.query_x, tasks.query_y)


def _mlp(sizes: list[int], gen: torch.Generator) -> nn.Sequential:
    """A tanh MLP whose weights come from ``gen`` (uniform ±1/sqrt(fan_in), biases zero)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(itertools.pairwise(sizes)):
        lin = nn.Linear(n_in, n_out, dtype=torch.float64)
        bound = 1.0 / math.sqrt(n_in)
        with torch.no_grad():
            lin.weight.copy_(torch.rand(n_out, n_in, generator=gen, dtype=torch.float64) * 2 * bound - bound)
            lin.bias.zero_()
        layers.append(lin)
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


class TaskGenerator(nn.Module):
    """``G_φ``: noise to task parameters inside a box (float64, so its gradient checks are exact).

    Args:
        ranges: ``[low, high]`` of every task parameter.
        noise_dim: the noise's dimension.
        hidden: the hidden layers' width.
        gen: the stream its initial weights come from.
    """

    def __init__(self, ranges: list[tuple[float, float]], *, noise_dim: int, hidden: int, gen: torch.Generator) -> None:
        super().__init__()
        if noise_dim < len(ranges):
            raise ValueError(f"the noise needs at least one dimension per task parameter ({len(ranges)})")
        self.noise_dim = noise_dim
        self.num_params = len(ranges)
        self.net = _mlp([noise_dim, hidden, hidden, len(ranges)], gen)
        last = self.net[-1]
        assert isinstance(last, nn.Linear)
        with torch.no_grad():  # the last layer starts small: the proposals start near ``sigmoid(scale * z)``
            last.weight.mul_(0.1)
        # sigmoid(1.7 z) of a standard normal z is close to uniform on [0, 1]: G starts as the direct arm's prior
        self.scale = nn.Parameter(torch.full((len(ranges),), 1.7, dtype=torch.float64))
        # the box comes from the config, so it is not part of the state
        self.low = torch.tensor([lo for lo, _ in ranges], dtype=torch.float64)
        self.width = torch.tensor([hi - lo for lo, hi in ranges], dtype=torch.float64)

    def unit(self, z: Tensor) -> Tensor:
        """Proposals in the box normalized to ``[0, 1]`` per parameter, ``[n, P]``."""
        return torch.sigmoid(self.scale * z[:, : self.num_params] + self.net(z))

    def forward(self, z: Tensor) -> Tensor:
        """Task parameters ``[n, P]`` for noise ``z`` ``[n, noise_dim]``."""
        return self.low + self.width * self.unit(z)

    def normalize(self, params: Tensor) -> Tensor:
        """Parameters mapped into the unit box (a zero-width range maps to 0)."""
        return (params.double() - self.low) / torch.where(self.width > 0, self.width, torch.ones_like(self.width))


def _nearest_distance(points: Tensor) -> Tensor:
    """Each point's distance to its nearest other point, ``[n]`` (points ``[n, P]``, ``n >= 2``)."""
    gaps = torch.cdist(points, points)
    eye = torch.eye(points.shape[0], dtype=torch.bool, device=points.device)
    return gaps.masked_fill(eye, math.inf).min(dim=1).values


class AdversarialTaskStage:
    """The ``generators`` server stage for ``mode: adversarial`` (module docstring).

    Args:
        cfg: the run configuration.
        experiment: the run's tasks, model and algorithm.
        rounds: the length of ``λ``'s schedule.
    """

    name = "generators"

    def __init__(self, cfg: Config, experiment: Experiment, *, rounds: int) -> None:
        from fedmeta.generators.constraints import build_constraints
        from fedmeta.generators.virtual import VirtualTaskStage
        from fedmeta.tasks import build_family

        # the direct stage's mixing, schedule, device and failure handling; only the tasks differ
        self.mixer = VirtualTaskStage(cfg, experiment, rounds=rounds)
        self.cfg = cfg
        self.options = cfg.generators.adversarial
        family = self.mixer.family
        if not isinstance(family, GeneratedRegression):
            raise ConfigError(f"config key 'generators.mode' 'adversarial' needs a generated family: {family.name!r}")
        self.family = family
        self.known = build_family(cfg)  # the clients' declared family (public config)
        self.constraints: list[Constraint] = build_constraints(cfg.generators.constraints)
        ranges = [(float(lo), float(hi)) for lo, hi in self.family.param_ranges()]
        gen = make_generator(cfg.seed, "generators", "init")
        a = self.options
        self.generator = TaskGenerator(ranges, noise_dim=a.noise_dim, hidden=a.hidden, gen=gen)
        self.g_opt = torch.optim.Adam(self.generator.parameters(), lr=a.lr, maximize=True)
        self.discriminator: nn.Sequential | None = None
        self.d_opt: torch.optim.Optimizer | None = None
        if a.discriminator > 0:
            self.discriminator = _mlp([SHAPE_POINTS, a.hidden, a.hidden, 1], gen)
            self.d_opt = torch.optim.Adam(self.discriminator.parameters(), lr=a.discriminator_lr)
        self.memory = torch.zeros(0, len(ranges), dtype=torch.float64)
        lo, hi = self.family.x_range
        self.grid = torch.linspace(lo, hi, SHAPE_POINTS, dtype=torch.float64).view(1, -1, 1)

    # -- what a proposal is worth ---------------------------------------------------------------

    def _tasks(self, params: Tensor, gen: torch.Generator, dtype: torch.dtype) -> TaskBatch:
        """The family's tasks for ``params`` (inputs drawn from ``gen``; differentiable in ``params``)."""
        return self.family.make_tasks(params.to(dtype), gen)

    def violation(self, params: Tensor) -> Tensor:
        """Each proposal's weighted constraint penalty on its own function, ``[n]`` (zeros without constraints).

        Each constraint is evaluated at its own collocation points (``x_range`` and ``points`` of its
        entry; the family's input range by default), as on the adapted models.
        """
        total = torch.zeros(params.shape[0], dtype=torch.float64)

        def fn(x: Tensor) -> Tensor:
            return self.family.function(params.double(), x)

        for c in self.constraints:
            spec = c.spec
            lo, hi = spec.x_range or self.family.x_range
            x = collocation_points((lo, hi), spec.points, tasks=params.shape[0], dtype=torch.float64)
            total = total + c.weight * c.penalty(fn, x).double()
        return total

    def shapes(self, params: Tensor) -> Tensor:
        """What the discriminator reads: each task's function on the grid over its largest magnitude."""
        y = self.family.function(params.double(), self.grid.expand(params.shape[0], -1, -1)).squeeze(-1)
        return y / (y.abs().amax(dim=1, keepdim=True) + 1e-6)

    def realism(self, params: Tensor) -> Tensor:
        """``log D(shape)`` of each proposal (zeros without a discriminator)."""
        if self.discriminator is None:
            return torch.zeros(params.shape[0], dtype=torch.float64)
        return torch.nn.functional.logsigmoid(self.discriminator(self.shapes(params)).squeeze(-1))

    def objective(self, meta: Params, z: Tensor, gen: torch.Generator) -> tuple[Tensor, dict[str, float]]:
        """``G``'s ascent objective (module docstring) on the proposals of noise ``z``, and its parts."""
        a = self.options
        dtype = next(iter(meta.values())).dtype
        params = self.generator(z)
        losses = post_adaptation_losses(self.mixer.algorithm, meta, self._tasks(params, gen, dtype)).double()
        spread = _nearest_distance(self.generator.unit(z)).mean()
        violation = self.violation(params).mean()
        realism = self.realism(params).mean()
        value = losses.mean() + a.diversity * spread - a.penalty * violation + a.discriminator * realism
        parts = {
            "loss": float(losses.detach().mean()),
            "spread": float(spread.detach()),
            "violation": float(violation.detach()),
        }
        return value, parts

    # -- one round ------------------------------------------------------------------------------

    def _train_discriminator(self, gen: torch.Generator) -> None:
        assert self.discriminator is not None and self.d_opt is not None
        n = self.options.candidates
        real = self.known.sample_params(gen, n, "train")
        with torch.no_grad():
            fake = self.generator(torch.randn(n, self.generator.noise_dim, generator=gen, dtype=torch.float64))
        logits = self.discriminator(torch.cat([self.shapes(real), self.shapes(fake)])).squeeze(-1)
        target = torch.cat([torch.ones(n), torch.zeros(n)]).double()
        self.d_opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(logits, target).backward()
        self.d_opt.step()

    def propose(self, round_idx: int, meta: Params) -> tuple[TaskBatch | None, dict[str, Any]]:
        """Train ``G`` (and ``D``) one round, then filter fresh proposals: the admitted tasks and the signatures.

        Returns:
            The admitted virtual tasks (``None`` when the filter admits none) and what goes in the
            metrics row: the generator's objective parts, candidates, admitted, the difficulty of
            the known tasks, the proposals' constraint violation and realism.
        """
        a = self.options
        gen = make_generator(self.cfg.seed, "generators", round_idx)
        meta = {k: v.detach() for k, v in meta.items()}
        dtype = next(iter(meta.values())).dtype
        noise = self.generator.noise_dim
        parts: dict[str, float] = {}
        if self.discriminator is not None:
            self._train_discriminator(gen)
        for _ in range(a.steps):
            z = torch.randn(a.candidates, noise, generator=gen, dtype=torch.float64)
            self.g_opt.zero_grad()
            value, parts = self.objective(meta, z, gen)
            value.backward()
            self.g_opt.step()
        with torch.no_grad():
            params = self.generator(torch.randn(a.candidates, noise, generator=gen, dtype=torch.float64))
        candidates = self._tasks(params, gen, dtype)
        known = self.known.sample(gen, a.candidates)
        difficulty = post_adaptation_losses(self.mixer.algorithm, meta, candidates).detach().double()
        reference = float(post_adaptation_losses(self.mixer.algorithm, meta, known).detach().double().mean())
        admitted = self.admit(params, difficulty, reference)
        violation = self.violation(params)
        info: dict[str, Any] = {
            "generator": parts,
            "candidates": a.candidates,
            "admitted": len(admitted),
            "known_difficulty": reference,
            "candidate_difficulty": float(difficulty.mean()),
            "violation": float(violation.mean()),
        }
        if self.discriminator is not None:
            with torch.no_grad():
                info["realism"] = float(self.realism(params).exp().mean())
        if self.mixer.map_due(round_idx):
            info["map"] = task_map(params, difficulty, admitted)
        if not admitted:
            return None, info
        chosen = torch.tensor(admitted[: self.cfg.generators.tasks])
        unit = self.generator.normalize(params[chosen])
        info["mixed"] = len(chosen)
        info["admitted_difficulty"] = float(difficulty[chosen].mean())
        info["task_spread"] = float(unit.std(dim=0).mean()) if len(chosen) > 1 else 0.0
        if a.memory:
            self.memory = torch.cat([self.memory, unit])[-a.memory :]
        return candidates.select(chosen), info

    def admit(self, params: Tensor, difficulty: Tensor, reference: float) -> list[int]:
        """Indices of the proposals the filter admits, hardest first (module docstring, step 3)."""
        a = self.options
        unit = self.generator.normalize(params)
        kept: list[int] = []
        seen = self.memory
        for i in torch.argsort(difficulty, descending=True).tolist():
            if float(difficulty[i]) < a.min_gap * reference:
                break
            if seen.shape[0] and float(torch.cdist(unit[i : i + 1], seen).min()) < a.min_distance:
                continue
            kept.append(i)
            seen = torch.cat([seen, unit[i : i + 1]])
        return kept

    def __call__(self, state: RoundState) -> None:
        if state.aggregate is None:
            return
        tasks, info = self.propose(state.round_idx, state.reference)
        failures = []
        if tasks is None or (info.get("task_spread", 1.0) == 0.0 and info["mixed"] > 1):
            failures.append("collapse")
        if info["violation"] > self.options.max_drift:
            failures.append("drift")
        self.mixer.mix(state, tasks, info, failures)

    def state_dict(self) -> dict[str, Any]:
        """The generator, the discriminator, their optimizers, the filter's memory and ``λ``'s damping."""
        state: dict[str, Any] = {
            "mixer": self.mixer.state_dict(),
            "generator": self.generator.state_dict(),
            "generator_optimizer": self.g_opt.state_dict(),
            "memory": self.memory.clone(),
        }
        if self.discriminator is not None and self.d_opt is not None:
            state["discriminator"] = self.discriminator.state_dict()
            state["discriminator_optimizer"] = self.d_opt.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
        self.mixer.load_state_dict(state["mixer"])
        self.generator.load_state_dict(state["generator"])
        self.g_opt.load_state_dict(state["generator_optimizer"])
        self.memory = torch.as_tensor(state["memory"], dtype=torch.float64)
        if self.discriminator is not None and self.d_opt is not None:
            self.discriminator.load_state_dict(state["discriminator"])
            self.d_opt.load_state_dict(state["discriminator_optimizer"])
