"""Privacy budgets: what a schedule spends, how many rounds fit, and sigma for a target epsilon.

All epsilons come from :class:`~fedmeta.privacy.accountant.PrivacyAccountant` (Opacus), and the
calibration of the noise multiplier is Opacus' own ``get_noise_multiplier`` binary search. A run
plans its budget *before* it starts: sigma and the sample rate are fixed by the config, so the
epsilon after every round is known in advance, and a schedule that would exceed
``privacy.target_epsilon`` is refused with the number of rounds that fit, or (with
``privacy.on_budget: stop``) cut to the last round that fits.

A resumed run plans *on top of what the checkpoint has spent*: the budget holder's history (the
``(noise_multiplier, sample_rate, steps)`` of the rounds already run, whatever settings they ran
with) followed by the remaining rounds at this run's settings, so a resume with, say, a smaller
noise multiplier is cut or refused as the composition demands. The server also checks before
every round that one more round fits (:func:`epsilon_after_next_round`).
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import asdict, dataclass
from typing import Any

from fedmeta.config import Config
from fedmeta.errors import BudgetExhausted
from fedmeta.privacy.accountant import PrivacyAccountant
from fedmeta.privacy.mechanisms import mechanism_for
from fedmeta.privacy.modes import accounting_parameters, describe_mode

__all__ = [
    "BudgetTarget",
    "PrivacyPlan",
    "plan_privacy",
    "rounds_that_fit",
    "calibrate_noise_multiplier",
    "calibrate_config_noise_multiplier",
    "enforce_budget",
    "budget_message",
    "epsilon_after_next_round",
    "History",
]

#: An accountant's history: ``(noise_multiplier, sample_rate, steps)`` per entry, oldest first.
History = list[tuple[float, float, int]]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PrivacyPlan:
    """What a config's schedule spends, computed without training.

    Attributes:
        mode: ``privacy.mode``.
        accountant: the Opacus mechanism (``None`` without DP).
        delta: ``privacy.delta``.
        noise_multiplier: ``privacy.noise_multiplier`` (the effective ``z`` with adaptive clipping).
        clip_norm: ``privacy.clip_norm`` (the initial one with adaptive clipping).
        accounted_noise_multiplier: the ``z`` the accountant is stepped with (``z / 2`` for
            client-local).
        sample_rate: the accountant's ``q``.
        unit: what is protected (``client`` or ``task``).
        rounds: ``federation.rounds``.
        steps: accountant steps the full schedule takes (for client-local and task: the worst
            case of a client or site that takes part in every round).
        epsilon: epsilon after the full schedule (``inf`` if noiseless; ``None`` without DP).
        target_epsilon: ``privacy.target_epsilon``.
        rounds_that_fit: with a target, the most rounds whose epsilon stays within it.
        within_budget: whether the full schedule stays within the target (``True`` without one).
        rounds_done: rounds already spent by a resumed run's checkpoint (``0`` for a fresh run);
            ``steps``, ``epsilon`` and ``rounds_that_fit`` then include them.
        spent_epsilon: epsilon those rounds spent (``None`` for a fresh run).
    """

    mode: str
    accountant: str | None
    delta: float
    noise_multiplier: float | None
    clip_norm: float | None
    accounted_noise_multiplier: float | None
    sample_rate: float | None
    unit: str | None
    rounds: int
    steps: int
    epsilon: float | None
    target_epsilon: float | None
    rounds_that_fit: int | None
    within_budget: bool
    rounds_done: int = 0
    spent_epsilon: float | None = None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (infinite epsilon becomes ``None`` with ``epsilon_unbounded: true``)."""
        out = asdict(self)
        out["epsilon_unbounded"] = self.epsilon is not None and math.isinf(self.epsilon)
        if out["epsilon_unbounded"]:
            out["epsilon"] = None
        if self.spent_epsilon is not None and math.isinf(self.spent_epsilon):
            out["spent_epsilon"] = None
        desc = describe_mode(self.mode)
        out["protects"] = desc.protects
        out["noise_added_by"] = desc.noise_added_by
        out["sample_rate_means"] = desc.sample_rate
        return out


def _epsilon_after(
    acc: PrivacyAccountant,
    steps: int,
    *,
    noise_multiplier: float,
    sample_rate: float,
    delta: float,
    history: History | None = None,
) -> float:
    # reuse one accountant so that rdp's per-(sigma, q) cache serves every probe
    entries = [e for e in (history or []) if e[2] > 0] + ([(noise_multiplier, sample_rate, steps)] if steps else [])
    acc.load_state_dict(
        {
            "mechanism": acc.mechanism,
            "noise_multipliers": [float(z) for z, _, _ in entries],
            "sample_rates": [float(q) for _, q, _ in entries],
            "steps": [int(n) for _, _, n in entries],
        }
    )
    return acc.get_epsilon(delta)


@dataclass(frozen=True)
class BudgetTarget:
    """What a budget search aims at: at most ``epsilon`` at ``delta``, for steps at ``sample_rate``.

    Attributes:
        epsilon: the target epsilon, ``> 0``.
        delta: the target delta.
        sample_rate: the accountant's ``q`` of every step.
        accountant: the Opacus mechanism (``rdp``, ``prv``, ``gdp``).

    Raises:
        ValueError: if ``epsilon`` is not positive (a search needs a positive epsilon to aim at).
    """

    epsilon: float
    delta: float
    sample_rate: float
    accountant: str = "rdp"

    def __post_init__(self) -> None:
        if not self.epsilon > 0:
            raise ValueError(f"target_epsilon must be positive, got {self.epsilon!r}")


def rounds_that_fit(
    target: BudgetTarget,
    *,
    noise_multiplier: float,
    max_rounds: int,
    steps_per_round: int = 1,
    history: History | None = None,
) -> int:
    """The largest ``n <= max_rounds`` whose epsilon after ``n`` more rounds is at most ``target.epsilon``.

    Epsilon grows with the number of identical steps, so this is a binary search over Opacus'
    epsilon.

    Args:
        target: the epsilon, delta, sample rate and accountant.
        noise_multiplier: the accountant's ``z`` of the rounds to come.
        max_rounds: the most rounds to consider.
        steps_per_round: accountant steps per round.
        history: what was spent before these rounds (a resumed run's), composed first.

    Returns:
        ``n`` (``0`` when not even one more round fits, or when the history alone exceeds the target).

    Raises:
        ValueError: on invalid parameters.
    """
    if max_rounds < 0:
        raise ValueError(f"max_rounds must be non-negative, got {max_rounds}")
    acc = PrivacyAccountant(target.accountant)

    def eps(n: int) -> float:
        return _epsilon_after(
            acc, n * steps_per_round, noise_multiplier=noise_multiplier, sample_rate=target.sample_rate,
            delta=target.delta, history=history,
        )  # fmt: skip

    if eps(max_rounds) <= target.epsilon:
        return max_rounds
    if history and eps(0) > target.epsilon:
        return 0
    lo, hi = 0, max_rounds  # eps(lo) <= target < eps(hi)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if eps(mid) <= target.epsilon:
            lo = mid
        else:
            hi = mid
    return lo


def calibrate_noise_multiplier(target: BudgetTarget, *, steps: int, tolerance: float = 0.01) -> float:
    """The accountant noise multiplier that spends at most ``target.epsilon`` in ``steps`` steps.

    Opacus' ``get_noise_multiplier`` (a binary search whose answer spends between
    ``target.epsilon - tolerance`` and ``target.epsilon``).

    Args:
        target: the epsilon, delta, sample rate and accountant.
        steps: accountant steps, ``>= 1``.
        tolerance: Opacus' epsilon tolerance.

    Raises:
        ValueError: if no noise multiplier up to Opacus' limit reaches the target, or on
            invalid parameters.
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # gdp warns at every probe
        return float(
            get_noise_multiplier(
                target_epsilon=target.epsilon,
                target_delta=target.delta,
                sample_rate=target.sample_rate,
                steps=steps,
                accountant=target.accountant,
                epsilon_tolerance=tolerance,
            )
        )


def calibrate_config_noise_multiplier(
    cfg: Config, *, target_epsilon: float | None = None, pool_size: int | None = None, tolerance: float = 0.01
) -> float:
    """``privacy.noise_multiplier`` that makes ``cfg``'s full schedule spend at most the target.

    Args:
        cfg: the run configuration (mode, rounds, sample rate, delta, accountant).
        target_epsilon: the target (default: ``privacy.target_epsilon``).
        pool_size: a site's task pool for ``task`` mode (default: ``task.tasks_per_site``).
        tolerance: Opacus' epsilon tolerance.

    Raises:
        ValueError: without DP, without a target, or when the target cannot be reached.
    """
    mechanism = mechanism_for(cfg)
    target = target_epsilon if target_epsilon is not None else cfg.privacy.target_epsilon
    if not mechanism.enabled:
        raise ValueError("privacy.mode is 'none': there is no noise multiplier to calibrate")
    if target is None:
        raise ValueError("no target epsilon: set privacy.target_epsilon or pass one")
    params = accounting_parameters(cfg, pool_size=pool_size)
    assert params is not None
    sigma = calibrate_noise_multiplier(
        BudgetTarget(target, cfg.privacy.delta, params.sample_rate, cfg.privacy.accountant),
        steps=cfg.federation.rounds * params.steps_per_round,
        tolerance=tolerance,
    )
    # the accountant's z is z / 2 under local DP; adaptive clipping keeps z as the effective total
    return mechanism.noise_multiplier_for(sigma)


def plan_privacy(
    cfg: Config, *, pool_size: int | None = None, history: History | None = None, rounds_done: int = 0
) -> PrivacyPlan:
    """What ``cfg`` would spend, without training.

    Args:
        cfg: the run configuration.
        pool_size: for ``task`` mode, the size of a site's task pool (default
            ``task.tasks_per_site``; the smallest site is the worst case).
        history: a resumed run's spending so far (the budget holder's accountant history, as the
            checkpoint holds it); the plan composes the remaining rounds on top of it.
        rounds_done: the rounds that history covers (the checkpoint's round).

    Raises:
        ConfigError: in ``task`` mode when the pool size is unknown.
        ValueError: if ``rounds_done`` is negative.
    """
    if rounds_done < 0:
        raise ValueError(f"rounds_done must be non-negative, got {rounds_done}")
    p, rounds = cfg.privacy, cfg.federation.rounds
    params = accounting_parameters(cfg, pool_size=pool_size)
    if params is None:
        return PrivacyPlan(
            mode=p.mode, accountant=None, delta=p.delta, noise_multiplier=None, clip_norm=None,
            accounted_noise_multiplier=None, sample_rate=None, unit=None, rounds=rounds, steps=0,
            epsilon=None, target_epsilon=p.target_epsilon, rounds_that_fit=None, within_budget=True,
        )  # fmt: skip
    resumed = rounds_done > 0 or bool(history)
    done = min(rounds_done, rounds)
    remaining = rounds - done
    spent_steps = sum(int(n) for _, _, n in history or [])
    steps = spent_steps + remaining * params.steps_per_round
    acc = PrivacyAccountant(p.accountant)
    epsilon = _epsilon_after(
        acc, remaining * params.steps_per_round, noise_multiplier=params.noise_multiplier,
        sample_rate=params.sample_rate, delta=p.delta, history=history,
    )  # fmt: skip
    spent = _epsilon_after(acc, 0, noise_multiplier=1.0, sample_rate=1.0, delta=p.delta, history=history)
    fit: int | None = None
    within = True
    if p.target_epsilon is not None:
        within = epsilon <= p.target_epsilon
        fit = rounds if within else done + rounds_that_fit(
            BudgetTarget(p.target_epsilon, p.delta, params.sample_rate, p.accountant),
            noise_multiplier=params.noise_multiplier, max_rounds=remaining, steps_per_round=params.steps_per_round,
            history=history,
        )  # fmt: skip
    return PrivacyPlan(
        mode=p.mode, accountant=p.accountant, delta=p.delta, noise_multiplier=p.noise_multiplier,
        clip_norm=p.clip_norm, accounted_noise_multiplier=params.noise_multiplier,
        sample_rate=params.sample_rate, unit=params.unit, rounds=rounds, steps=steps, epsilon=epsilon,
        target_epsilon=p.target_epsilon, rounds_that_fit=fit, within_budget=within,
        rounds_done=done if resumed else 0, spent_epsilon=spent if resumed else None,
    )  # fmt: skip


def budget_message(plan: PrivacyPlan, *, calibrated: float | None = None) -> str:
    """One paragraph saying that and by how much ``plan`` exceeds its target, and what to do."""
    who = mechanism_for(plan.mode).budget_holder
    eps = _eps_text(plan.epsilon)
    if plan.spent_epsilon is not None:
        text = (
            f"privacy.target_epsilon={plan.target_epsilon:g} would be exceeded on resume: the checkpoint's "
            f"{plan.rounds_done} rounds have spent epsilon={_eps_text(plan.spent_epsilon)} for {who}, and its "
            f"remaining {plan.rounds - plan.rounds_done} rounds at this run's settings (noise_multiplier "
            f"{plan.noise_multiplier:g}, sample rate {plan.sample_rate:.4g}, {plan.accountant} accountant) "
            f"would reach epsilon={eps} at delta={plan.delta:g}; only {plan.rounds_that_fit} rounds in all fit."
        )
        calibrated = None  # a calibration is for a fresh schedule, not for one on top of a history
    else:
        text = (
            f"privacy.target_epsilon={plan.target_epsilon:g} would be exceeded: {plan.rounds} rounds of "
            f"{plan.mode} DP (noise_multiplier {plan.noise_multiplier:g}, sample rate {plan.sample_rate:.4g}, "
            f"{plan.accountant} accountant) spend epsilon={eps} at delta={plan.delta:g} for {who}; "
            f"only {plan.rounds_that_fit} rounds fit."
        )
    fixes = []
    if plan.spent_epsilon is not None and (plan.rounds_that_fit or 0) <= plan.rounds_done:
        return text + (
            " The checkpoint leaves no room for another round at these settings: raise privacy.noise_multiplier, "
            "raise the target (if that is what was meant) or start a new run."
        )
    if plan.rounds_that_fit:
        fixes.append(f"set federation.rounds to at most {plan.rounds_that_fit}")
    if calibrated is not None:
        fixes.append(f"raise privacy.noise_multiplier to {calibrated:.4g} to fit all {plan.rounds} rounds")
    else:
        fixes.append("raise privacy.noise_multiplier (fedmeta privacy CONFIG --calibrate)")
    if plan.rounds_that_fit:
        fixes.append(f"or set privacy.on_budget: stop to stop cleanly after round {plan.rounds_that_fit}")
    return text + " To run: " + ", ".join(fixes) + "."


def _eps_text(eps: float | None) -> str:
    return "unbounded" if eps is not None and math.isinf(eps) else f"{eps:.4g}"


def enforce_budget(
    cfg: Config,
    *,
    plan: PrivacyPlan | None = None,
    pool_size: int | None = None,
    history: History | None = None,
    rounds_done: int = 0,
) -> int:
    """How many rounds a run may take under its budget; refuse to start if none (or if so configured).

    Args:
        cfg: the run configuration.
        plan: a plan already computed for ``cfg``.
        pool_size: for ``task`` mode (see :func:`plan_privacy`).
        history: a resumed run's spending so far (see :func:`plan_privacy`).
        rounds_done: the rounds that history covers.

    Returns:
        ``federation.rounds`` when the schedule fits (or there is no target or no DP); with
        ``privacy.on_budget: stop``, the last round that fits (the total, resumed rounds included).

    Raises:
        BudgetExhausted: with ``on_budget: refuse`` when the schedule would exceed the target,
            or when not even one (more) round fits; the message says how many rounds fit and how
            to fix the config.
    """
    plan = plan or plan_privacy(cfg, pool_size=pool_size, history=history, rounds_done=rounds_done)
    if plan.within_budget:
        return plan.rounds
    assert plan.rounds_that_fit is not None
    if cfg.privacy.on_budget == "stop" and plan.rounds_that_fit > plan.rounds_done:
        log.warning(
            "privacy.target_epsilon=%g allows %d of %d rounds: the run will stop cleanly after round %d",
            plan.target_epsilon, plan.rounds_that_fit, plan.rounds, plan.rounds_that_fit,
        )  # fmt: skip
        return plan.rounds_that_fit
    calibrated: float | None = None
    if plan.spent_epsilon is None:
        try:
            calibrated = calibrate_config_noise_multiplier(cfg, pool_size=pool_size)
        except ValueError:
            calibrated = None
    raise BudgetExhausted(budget_message(plan, calibrated=calibrated))


def epsilon_after_next_round(
    cfg: Config,
    history: History,
    *,
    pool_size: int | None = None,
    rdp_cache: dict[tuple[float, float], Any] | None = None,
) -> float | None:
    """Epsilon the budget holder would reach after one more round at ``cfg``'s settings.

    Args:
        cfg: the run configuration (its accounting parameters are the coming round's).
        history: what the budget holder has spent so far.
        pool_size: for ``task`` mode (see :func:`plan_privacy`).
        rdp_cache: RDP curves kept by the caller across rounds (see :class:`PrivacyAccountant`);
            a check before every round would otherwise recompute them every time.

    Returns:
        The epsilon, or ``None`` without DP.
    """
    params = accounting_parameters(cfg, pool_size=pool_size)
    if params is None:
        return None
    return _epsilon_after(
        PrivacyAccountant(cfg.privacy.accountant, rdp_cache=rdp_cache), params.steps_per_round,
        noise_multiplier=params.noise_multiplier,
        sample_rate=params.sample_rate, delta=cfg.privacy.delta, history=history,
    )  # fmt: skip
