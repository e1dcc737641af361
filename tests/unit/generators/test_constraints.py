"""Soft constraints (issue 17): every penalty against an analytic value, the meta-gradient with the
constraint term against finite differences of an independent implementation (float64, input
derivatives by ``torch.func``), and the settings they refuse."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import grad as fgrad

from fedmeta.algorithms import MAML
from fedmeta.algorithms.engine import PerTaskOps
from fedmeta.config import ConstraintConfig, config_from_dict
from fedmeta.errors import ConfigError
from fedmeta.experiment import Experiment
from fedmeta.generators.constraints import CONSTRAINTS, ConstraintTerm, build_constraints, collocation_points
from fedmeta.models import MLP
from fedmeta.types import TaskBatch, model_part

X = collocation_points((0.0, 5.0), 201, tasks=3, dtype=torch.float64)


def _penalty(spec: ConstraintConfig, fn: object, x: torch.Tensor = X) -> torch.Tensor:
    (constraint,) = build_constraints([spec])
    return constraint.penalty(fn, x)  # type: ignore[arg-type]


def test_the_ode_residual_vanishes_on_exact_oscillators_and_not_elsewhere() -> None:
    """Three damped oscillators with different ω, ζ, amplitude and phase solve y'' + 2ζω y' + ω² y = 0:
    the least-squares residual is 0 for each (the coefficients are fitted, not told); x² is no solution."""
    omega = torch.tensor([0.7, 1.3, 2.0], dtype=torch.float64).view(3, 1, 1)
    zeta = torch.tensor([0.0, 0.1, 0.2], dtype=torch.float64).view(3, 1, 1)
    amp = torch.tensor([1.0, 3.0, 0.5], dtype=torch.float64).view(3, 1, 1)
    phase = torch.tensor([0.0, 1.0, 2.5], dtype=torch.float64).view(3, 1, 1)
    wd = omega * torch.sqrt(1 - zeta**2)

    def oscillators(x: torch.Tensor) -> torch.Tensor:
        return amp * torch.exp(-zeta * omega * x) * torch.sin(wd * x + phase)

    spec = ConstraintConfig(kind="ode")
    # ≈ 0: the fit's 1e-8 ridge (which keeps a flat output's 2x2 system solvable) leaves ~1e-15
    assert torch.all(_penalty(spec, oscillators) < 1e-12)
    # y = x^2: y'' = 2, y' = 2x, so 2 + 2a x + b x^2 = 0 for all x has no solution
    assert torch.all(_penalty(spec, lambda x: x**2) > 1e-2)


def test_periodicity_symmetry_and_monotonicity_against_analytic_values() -> None:
    period = 2 * math.pi / 1.7
    periodic = ConstraintConfig(kind="periodic", period=period)
    assert torch.all(_penalty(periodic, lambda x: torch.sin(1.7 * x + 0.3)) < 1e-25)
    # sin(x + 1) - sin(x) = 2 cos(x + 1/2) sin(1/2): the mean of its square over the grid
    value = _penalty(ConstraintConfig(kind="periodic", period=1.0), torch.sin)
    want = (2 * math.sin(0.5) * torch.cos(X[0] + 0.5)).pow(2).mean()
    assert torch.allclose(value, want.expand(3), rtol=1e-12)

    x = collocation_points((-3.0, 3.0), 101, tasks=2, dtype=torch.float64)
    odd, even = ConstraintConfig(kind="symmetry", parity="odd"), ConstraintConfig(kind="symmetry", parity="even")
    assert torch.all(_penalty(odd, torch.sin, x) < 1e-28) and torch.all(_penalty(even, torch.cos, x) < 1e-28)
    assert torch.allclose(_penalty(odd, torch.cos, x), (2 * torch.cos(x[0])).pow(2).mean().expand(2), rtol=1e-12)
    # about another centre: (x - 1)^2 is even about 1
    about_one = ConstraintConfig(kind="symmetry", parity="even", center=1.0)
    assert torch.all(_penalty(about_one, lambda v: (v - 1) ** 2) < 1e-25)

    increasing = ConstraintConfig(kind="monotone", direction="increasing")
    assert torch.all(_penalty(increasing, lambda v: v**3) == 0)
    assert torch.allclose(_penalty(increasing, lambda v: -2 * v), torch.full((3,), 4.0, dtype=torch.float64))
    assert torch.all(_penalty(ConstraintConfig(kind="monotone", direction="decreasing"), lambda v: -v) == 0)


def test_lipschitz_and_bound_against_analytic_values() -> None:
    lip = ConstraintConfig(kind="lipschitz", constant=2.0)
    assert torch.allclose(_penalty(lip, lambda v: 3 * v), torch.ones(3, dtype=torch.float64))  # (3 - 2)^2
    assert torch.all(_penalty(ConstraintConfig(kind="lipschitz", constant=4.0), lambda v: 3 * v) == 0)
    assert torch.all(_penalty(ConstraintConfig(kind="lipschitz", constant=1.0), torch.sin) == 0)  # |cos| <= 1
    bounded = ConstraintConfig(kind="bounded", bound=1.0)
    want = torch.clamp((2 * torch.sin(X[0])).abs() - 1, min=0).pow(2).mean()
    assert torch.allclose(_penalty(bounded, lambda v: 2 * torch.sin(v)), want.expand(3), rtol=1e-12)
    assert torch.all(_penalty(ConstraintConfig(kind="bounded", bound=2.0), lambda v: 2 * torch.sin(v)) == 0)


SPECS = (
    ConstraintConfig(kind="ode", weight=0.5, points=9),
    ConstraintConfig(kind="lipschitz", constant=0.5, weight=0.3, points=7),
    ConstraintConfig(kind="bounded", bound=0.2, weight=2.0, points=5, x_range=(-1.0, 2.0)),
    ConstraintConfig(kind="periodic", period=1.5, weight=1.0, points=6),
)


def _reference_penalty(model: MLP, params: dict[str, torch.Tensor], spec: ConstraintConfig) -> torch.Tensor:
    """One adapted model's penalty, point by point with ``torch.func`` derivatives (not the batched code)."""
    lo, hi = spec.x_range or (0.0, 5.0)
    xs = torch.linspace(lo, hi, spec.points, dtype=torch.float64)

    def f(x: torch.Tensor) -> torch.Tensor:
        return model.forward(params, x.view(1, 1)).squeeze()

    df, d2f = fgrad(f), fgrad(fgrad(f))
    if spec.kind == "ode":
        y = torch.stack([f(x) for x in xs])
        dy = torch.stack([df(x) for x in xs])
        d2y = torch.stack([d2f(x) for x in xs])
        a = torch.stack([dy, y], dim=1)
        gram = a.T @ a
        gram = gram + 1e-8 * gram.trace() * torch.eye(2, dtype=torch.float64)
        coef = torch.linalg.solve(gram, a.T @ (-d2y))
        return (d2y + a @ coef).pow(2).mean()
    if spec.kind == "lipschitz":
        return torch.stack([torch.relu(df(x).abs() - spec.constant) ** 2 for x in xs]).mean()
    if spec.kind == "bounded":
        return torch.stack([torch.relu(f(x).abs() - spec.bound) ** 2 for x in xs]).mean()
    return torch.stack([(f(x + spec.period) - f(x)) ** 2 for x in xs]).mean()


def test_meta_gradient_with_constraints_matches_finite_differences() -> None:
    """MAML (second order) on a tanh MLP: the mean of the engine's rows is the gradient of
    ``mean_t L_t + Σ_c λ_c mean_t penalty_c(φ_t)``, built task by task with ``torch.func`` derivatives."""
    model = MLP((1,), (8, 8), 1, activation="tanh")
    algo = MAML(model, kind="regression", inner_lr=0.05, inner_steps=2)
    ranges = [s.x_range or (0.0, 5.0) for s in SPECS]
    algo.with_terms(ConstraintTerm(build_constraints(SPECS), ranges, [s.points for s in SPECS]))
    meta = {k: v.double() for k, v in algo.init_meta_params(torch.Generator().manual_seed(2)).items()}
    gen = torch.Generator().manual_seed(4)
    sx, qx = (torch.rand(3, n, 1, generator=gen, dtype=torch.float64) * 5 for n in (5, 6))
    tasks = TaskBatch(sx, torch.sin(sx), qx, torch.sin(qx), "regression")
    rows, _ = algo.task_updates(meta, tasks)
    mean = {k: v.mean(dim=0) for k, v in rows.items()}
    ops = PerTaskOps(algo)

    def objective(m: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros((), dtype=torch.float64)
        for t in range(3):
            loss, state = algo.objective(ops, m, sx[t], tasks.support_y[t], qx[t], tasks.query_y[t])
            adapted = model_part(algo.adapted_model(state))
            total = total + loss + sum(s.weight * _reference_penalty(model, adapted, s) for s in SPECS)
        return total / 3

    eps = 1e-6
    for _ in range(3):
        v = {k: torch.randn(t.shape, generator=gen, dtype=torch.float64) for k, t in meta.items()}
        numeric = float(
            (objective({k: meta[k] + eps * v[k] for k in meta}) - objective({k: meta[k] - eps * v[k] for k in meta}))
            / (2 * eps)
        )
        analytic = float(sum((mean[k] * v[k]).sum() for k in meta))
        assert abs(analytic - numeric) < 1e-6 * max(1.0, abs(numeric)), (analytic, numeric)


def _cfg(**sections: object) -> dict[str, object]:
    data: dict[str, object] = {"task": {"name": "harmonic"}, "model": {"activation": "tanh"}}
    data.update(sections)
    return data


def test_constraints_enter_the_run_and_task_level_dp_accepts_them() -> None:
    cfg = config_from_dict(_cfg(
        generators={"constraints": [{"kind": "ode", "points": 16}]},
        privacy={"mode": "task"},
        task={"name": "harmonic", "tasks_per_site": 20},
    ))
    exp = Experiment(cfg)
    (term,) = exp.algorithm.terms
    assert isinstance(term, ConstraintTerm) and term.separable_per_task and term.x_ranges == [(0.0, 5.0)]
    assert not Experiment(config_from_dict(_cfg())).algorithm.terms  # none declared: the plain run


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (_cfg(model={"activation": "relu"}, generators={"constraints": [{"kind": "ode"}]}),
         r"constraints\[0\].kind' 'ode' penalizes input derivatives.*model.activation"),
        (_cfg(generators={"constraints": [{"kind": "bounded"}]}), r"constraints\[0\].bound' is required"),
        (_cfg(generators={"constraints": [{"kind": "ode"}, {"kind": "periodic", "period": -1}]}),
         r"constraints\[1\].period' must be > 0"),
        (_cfg(generators={"constraints": [{"kind": "wave"}]}), r"constraints\[0\].kind' must be one of"),
        (_cfg(generators={"constraints": [{"kind": "ode", "points": 1}]}), r"constraints\[0\].points"),
        (_cfg(generators={"constraints": [{"kind": "symmetry", "parity": "both"}]}), r"constraints\[0\].parity"),
        (_cfg(generators={"constraints": [{"kind": "ode", "x_range": [2, 1]}]}), r"constraints\[0\].x_range"),
        ({"task": {"name": "glyphs"}, "model": {"name": "conv4", "activation": "tanh"}}, "model.activation"),
        ({"model": {"activation": "cubic"}}, "model.activation"),
    ],
)
def test_bad_constraints_are_refused_naming_the_entry(data: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        Experiment(config_from_dict(data))


def test_every_kind_is_registered_and_the_mlp_activation_is_used() -> None:
    assert set(CONSTRAINTS) == {"bounded", "lipschitz", "periodic", "symmetry", "monotone", "ode"}
    model = MLP((1,), (4,), 1, activation="softplus")
    params = {k: v.double() for k, v in model.init_params(torch.Generator().manual_seed(0)).items()}
    x = torch.linspace(-1, 1, 5, dtype=torch.float64).view(5, 1)
    hidden = torch.nn.functional.softplus(x @ params["body.1.weight"].T + params["body.1.bias"])
    assert torch.allclose(model.forward(params, x), hidden @ params["head.weight"].T + params["head.bias"])
    assert model.smooth and not MLP((1,), (4,), 1).smooth


def test_eval_task_draws_the_held_out_tasks_from_other_ranges_only() -> None:
    """``eval.task`` (SPEC §10): clients train on a narrow amplitude band, the held-out tasks span the
    full range; training tasks are untouched, and a bad range names ``eval.task``."""
    narrow = {"task": {"name": "sinusoid", "amplitude": [0.1, 1.05]}}
    plain = Experiment(config_from_dict(narrow))
    wide = Experiment(config_from_dict({**narrow, "eval": {"tasks": 400, "task": {"amplitude": [0.1, 5.0]}}}))
    train_a, train_b = plain.source.client_tasks(3, 1), wide.source.client_tasks(3, 1)
    assert torch.equal(train_a.support_y, train_b.support_y)
    assert float(plain.source.eval_tasks(400).query_y.abs().max()) <= 1.05
    assert float(wide.source.eval_tasks().query_y.abs().max()) > 3.0
    with pytest.raises(ConfigError, match="eval.task.amplitude"):
        config_from_dict({"eval": {"task": {"amplitude": [3.0, 1.0]}}})
    with pytest.raises(ConfigError, match="eval.task.*generated family"):
        config_from_dict({"task": {"name": "glyphs"}, "model": {"name": "conv4"}, "eval": {"task": {"omega": [1, 2]}}})
