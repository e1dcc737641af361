"""``privacy.mode: task``: task-level DP inside each site, with Opacus' DP optimizer (DP-SGD).

Abadi et al. (2016), "Deep Learning with Differential Privacy": each site Poisson-samples its pool
of tasks, clips every task's meta-gradient, adds noise to their sum and divides by the expected
batch size; it keeps its own accountant in its node state and reports its epsilon. The unit is one
task of a site (e.g. one patient of a hospital).

Add/remove-one-task adjacency protects the size of a site's pool too, so nothing a site sends
depends on it: the sample rate ``q = meta.tasks_per_client / task.tasks_per_site`` and the divisor
``q * task.tasks_per_site`` come from the public config (``task.tasks_per_site`` is the pool size
the run is planned for, not a count of the site's tasks; a folder site Poisson-samples the tasks
it actually stores at that rate), the start-up answer carries no task count, and the site's report
is its epsilon, delta and steps, functions of public parameters only (:attr:`TaskPrivacy.public`).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from fedmeta.errors import BudgetExhausted, ConfigError
from fedmeta.privacy.accountant import PrivacyAccountant
from fedmeta.privacy.mechanisms.base import MECHANISMS, ClientSetup, PrivacyMechanism, RoundRelease, TrainInstruction
from fedmeta.privacy.modes import AccountingParameters, ModeDescription, task_sample_rate
from fedmeta.registry import require as _require
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.algorithms import MetaUpdate
    from fedmeta.config import Config
    from fedmeta.experiment import Experiment
    from fedmeta.privacy.facade import ClientPrivacy, ServerPrivacy
    from fedmeta.tasks import TaskSource

__all__ = ["TaskPrivacy", "private_task_update", "SITE_REPORT_KEYS"]

#: What a site reports with its update: functions of the public parameters and of the rounds it
#: took part in (the server could recompute them), never its task count or sample rate.
SITE_REPORT_KEYS = ("privacy.epsilon", "privacy.delta", "privacy.steps")

log = logging.getLogger(__name__)


@MECHANISMS.register("task")
class TaskPrivacy(PrivacyMechanism):
    """Task-level DP: each site clips every task's meta-gradient and noises their sum itself.

    What leaves a site: the sum of its privatized DP-SGD steps, a nominal task count, and its own
    epsilon, delta and steps (functions of public parameters; never its task count or sample rate).
    """

    name = "task"
    unit = "task"
    noise_added_by = "site"
    leaves_site = (
        "the sum of its privatized DP-SGD steps, a nominal task count, and its own epsilon, delta and steps "
        "(functions of public parameters; never its task count or sample rate)"
    )
    public = (
        "privacy.noise_multiplier",
        "privacy.clip_norm",
        "privacy.delta",
        "privacy.accountant",
        "meta.tasks_per_client",
        "meta.local_steps",
        "task.tasks_per_site",
        "which rounds a site took part in",
    )
    description = ModeDescription(
        name="task",
        protects="one task of a site (e.g. one patient of a hospital) against everyone outside the site",
        noise_added_by="the site, with Opacus' DP optimizer: per-task clipping of meta-gradients "
        "and Gaussian noise on their sum",
        server_sees="each site's privatized mean meta-gradient and its epsilon",
        sample_rate="tasks_per_client / task.tasks_per_site, from the public config (never from the "
        "site's own task count): each task joins the site's meta-batch independently with this "
        "probability (Poisson sampling inside the site)",
        dropouts="a site that is not sampled or drops out takes no step and spends nothing",
        accountant="one per site, persisted in the site's state across rounds; the site reports "
        "its own (epsilon, delta)",
    )
    #: per-task clipping bounds each task's contribution only if the objective is a sum over tasks
    accepts_non_separable_terms = False
    counts_site_pools = True
    client_keeps_state = True
    batched_cohort = False
    budget_holder = "a site that takes part in every round"

    def check_config(self, cfg: Config) -> None:
        """No adaptive clipping; a public pool size ``task.tasks_per_site`` (folder sites too).

        Raises:
            ConfigError: naming ``privacy.adaptive_clipping`` or ``task.tasks_per_site``.
        """
        super().check_config(cfg)
        t = cfg.task
        _require(
            t.tasks_per_site is not None,
            "task.tasks_per_site",
            t.tasks_per_site,
            "must be set for privacy.mode 'task' (the site's fixed pool of tasks is what task-level DP "
            "protects; its sampling rate is meta.tasks_per_client / task.tasks_per_site, public, so that "
            "nothing a site sends depends on how many tasks it holds; folder sites too)",
        )

    # -- budget planning -------------------------------------------------------------------------

    def accounting_parameters(self, cfg: Config, *, pool_size: int | None = None) -> AccountingParameters:
        """``z`` at ``q = tasks_per_client / pool``, ``meta.local_steps`` steps per round, per task.

        Raises:
            ConfigError: when the pool size is unknown.
        """
        pool = pool_size if pool_size is not None else cfg.task.tasks_per_site
        if pool is None:
            raise ConfigError(
                "privacy.mode 'task' needs the size of a site's task pool: set task.tasks_per_site "
                "(or point task.data_dir at the site folders so their tasks can be counted)"
            )
        # every local meta-step of a round is one DP-SGD step over the site's tasks
        return AccountingParameters(
            cfg.privacy.noise_multiplier,
            task_sample_rate(cfg.meta.tasks_per_client, pool),
            "task",
            steps_per_round=cfg.meta.local_steps,
        )

    def site_pool_size(self, source: TaskSource, client_id: int) -> int | None:
        """The public pool size the site's privacy is set up for: ``task.tasks_per_site``.

        Not the number of tasks the site stores (that is private: add/remove-one-task adjacency
        protects it); a folder site samples its stored tasks at the public rate.
        """
        return source.cfg.task.tasks_per_site

    # -- client side -----------------------------------------------------------------------------

    def init_client(self, client: ClientPrivacy, setup: ClientSetup) -> None:
        """The site's :class:`~fedmeta.privacy.task_level.TaskLevelPrivacy` (its accountant persists).

        Raises:
            ConfigError: without a pool size.
        """
        from fedmeta.privacy.task_level import TaskLevelPrivacy

        cfg = client.cfg
        pool = setup.pool_size if setup.pool_size is not None else cfg.task.tasks_per_site
        if pool is None:
            raise ConfigError("privacy.mode 'task' needs the site's pool size (task.tasks_per_site or its task folder)")
        client.pool_size = int(pool)
        client.site = TaskLevelPrivacy.from_config(
            cfg, pool_size=client.pool_size, state=dict(setup.state) if setup.state else None, rdp_cache=setup.rdp_cache
        )

    def privatize_update(
        self, client: ClientPrivacy, update: Params, *, round_idx: int, clip_norm: float | None
    ) -> tuple[Params, dict[str, float]]:
        """Refused: a site privatizes per-task gradients, not a computed mean update.

        Raises:
            ValueError: always.
        """
        raise ValueError("task-level DP privatizes per-task gradients: use privatize_task_gradients")

    def client_update(
        self, exp: Experiment, client: ClientPrivacy, train: TrainInstruction
    ) -> tuple[MetaUpdate, dict[str, float]]:
        """:func:`private_task_update` (the server's clip norm does not apply)."""
        return private_task_update(exp, train.meta, train.round_idx, train.client_id, client)

    # -- server side -----------------------------------------------------------------------------

    def account(self, server: ServerPrivacy, release: RoundRelease) -> None:
        """Record every reporting site's own report: its epsilon, delta and steps (nothing else is kept)."""
        for cid, rep in (release.reports or {}).items():
            site = {k: float(v) for k, v in rep.items() if k in SITE_REPORT_KEYS}
            if site:
                server.site_reports[int(cid)] = site

    def epsilon(self, server: ServerPrivacy) -> float:
        """The largest epsilon any site reported."""
        return max((r.get("privacy.epsilon", 0.0) for r in server.site_reports.values()), default=0.0)

    def summary_entry(self, server: ServerPrivacy) -> dict[str, Any]:
        """How many sites reported."""
        return {"sites_reporting": len(server.site_reports)}


def _check_steps_fit(privacy: ClientPrivacy, steps: int) -> None:
    # refuse a whole round up front rather than after some of its local DP steps
    site = privacy.site
    assert site is not None
    if site.target_epsilon is None or steps <= 1:
        site.check_budget()
        return
    probe = PrivacyAccountant.from_state_dict(site.accountant.state_dict(), rdp_cache=site.accountant.rdp_cache)
    probe.step(noise_multiplier=site.noise_multiplier, sample_rate=site.sample_rate, steps=steps)
    after = probe.get_epsilon(site.delta)
    if after > site.target_epsilon:
        raise BudgetExhausted(
            f"this site's task-level privacy budget is spent: after {site.accountant.steps} steps "
            f"epsilon={site.epsilon():.4g}; this round's {steps} local steps would reach {after:.4g} > "
            f"privacy.target_epsilon={site.target_epsilon:g} (delta={site.delta:g})"
        )


def private_task_update(
    exp: Experiment, meta: Params, round_idx: int, client_id: int, privacy: ClientPrivacy
) -> tuple[MetaUpdate, dict[str, float]]:
    """A site's update under task-level DP: ``meta.local_steps`` DP-SGD steps over its task pool.

    Each step draws a Poisson sample of the site's tasks from the secret generator, computes the
    sampled tasks' exact meta-gradients at the current local parameters, and privatizes them with
    Opacus (clip per task, noise the sum, divide by the expected batch size). An empty sample
    still releases pure noise and is accounted, as Poisson DP-SGD requires.

    Args:
        exp: the site's experiment (its task source holds the pool).
        meta: the meta-parameters received from the server (never modified).
        round_idx: the round.
        client_id: the site's client id.
        privacy: the site's :class:`ClientPrivacy` in ``task`` mode (its accountant persists).

    Returns:
        ``(update, report)``: the sum of the privatized steps with the nominal task count and no
        training metrics, and the site's own ``privacy.*`` report (its epsilon so far).

    Raises:
        BudgetExhausted: if the round's steps would take the site past ``privacy.target_epsilon``
            (checked before any step: nothing is computed or accounted).
    """
    from fedmeta.algorithms import MetaUpdate
    from fedmeta.privacy.client_update import nominal_num_tasks

    TaskPrivacy().check_objective_terms(exp.algorithm.terms)
    cfg = exp.cfg
    steps = cfg.meta.local_steps
    lr = cfg.meta.local_step_size
    _check_steps_fit(privacy, steps)
    current = {k: v.detach() for k, v in meta.items()}
    total: Params = {k: torch.zeros_like(v) for k, v in current.items()}
    report: dict[str, float] = {}
    for _ in range(steps):
        tasks = privacy.sample_tasks(exp.source, round_idx)
        per_task = None if tasks is None else exp.algorithm.task_updates(current, tasks)[0]
        grad, report = privacy.privatize_task_gradients(per_task, reference=current, round_idx=round_idx)
        total = {k: total[k] + grad[k] for k in total}
        if steps > 1:
            current = {k: current[k] - lr * grad[k] for k in current}
    return MetaUpdate(total, nominal_num_tasks(cfg), {}), TaskPrivacy().releasable_metrics(report)
