"""The privacy modes: what each protects, who adds the noise, and what the accountant is told.

========================  ===================================================================
``none``                  no differential privacy.
``client-central``        unit: a whole client (site). Trusted server clips every client's
                          meta-update to ``clip_norm``, adds ``N(0, (z C)^2)`` to the sum and
                          divides by the expected cohort size (DP-FedAvg, McMahan et al., 2018).
                          ``sample_rate`` = clients_per_round / clients_total: the probability
                          that a client joins a round under Poisson sampling.
``client-local``          unit: a whole client. Every client clips and adds the full noise
                          itself; the (untrusted) server only sees privatized updates. Accounted
                          per client with ``sample_rate`` = 1 (the server knows who took part, so
                          no amplification by sampling) and noise multiplier ``z / 2`` (local DP
                          compares *any* two inputs of a client: sensitivity ``2 C``).
``task``                  unit: one task of a site (e.g. one patient of a hospital). The site
                          clips every task's meta-gradient and adds noise to their sum with
                          Opacus' DP optimizer (DP-SGD, Abadi et al., 2016). ``sample_rate`` =
                          tasks_per_client / the site's pool of tasks: the probability that a
                          given task is in the site's Poisson-sampled meta-batch.
========================  ===================================================================

The full trust model (what each party sees, dropouts, what is not covered) is in
``docs/privacy.md``; :data:`MODES` carries the same facts for ``fedmeta privacy`` to print.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmeta.config import Config
from fedmeta.errors import ConfigError
from fedmeta.privacy.adaptive import effective_noise_multiplier, update_noise_multiplier

__all__ = [
    "ModeDescription",
    "MODES",
    "describe_mode",
    "AccountingParameters",
    "accounting_parameters",
    "task_sample_rate",
    "update_noise",
    "LOCAL_SENSITIVITY_FACTOR",
    "releasable_metrics",
]

#: Under local DP two neighbouring inputs are *any* two updates of norm <= C, at distance <= 2 C.
LOCAL_SENSITIVITY_FACTOR = 2.0


@dataclass(frozen=True)
class ModeDescription:
    """The trust model of one privacy mode, in words."""

    name: str
    protects: str
    noise_added_by: str
    server_sees: str
    sample_rate: str
    dropouts: str
    accountant: str


MODES: dict[str, ModeDescription] = {
    "none": ModeDescription(
        name="none",
        protects="nothing (no differential privacy)",
        noise_added_by="nobody",
        server_sees="every client's raw mean meta-update and training metrics",
        sample_rate="not used",
        dropouts="lower the round's weight only",
        accountant="none",
    ),
    "client-central": ModeDescription(
        name="client-central",
        protects="a whole client: everything one site contributes over the run",
        noise_added_by="the server (trusted), once per round, on the sum of clipped client updates",
        server_sees="every participant's raw meta-update (it is trusted); the released model is private",
        sample_rate="clients_per_round / clients_total: each client joins a round independently "
        "with this probability (Poisson sampling from a secret seed)",
        dropouts="a sampled client that does not reply adds nothing to the sum; the noise and the "
        "divisor (the expected cohort size) do not change, so the guarantee holds and the round "
        "is only noisier",
        accountant="one per run on the server, stepped once per round, saved in checkpoint.pt",
    ),
    "client-local": ModeDescription(
        name="client-local",
        protects="a whole client, against the server and anyone who sees its messages",
        noise_added_by="each client, on its own clipped update, with the full noise",
        server_sees="only privatized updates (and, with adaptive clipping, noisy clip bits)",
        sample_rate="1: the server knows who took part, so sampling gives no amplification; "
        "each client is accounted for the rounds it took part in",
        dropouts="no effect on anyone's guarantee; a client that drops out simply spends nothing",
        accountant="one per client: kept by the client itself (which refuses to exceed its "
        "budget) and mirrored by the server, which reports the largest epsilon of any client",
    ),
    "task": ModeDescription(
        name="task",
        protects="one task of a site (e.g. one patient of a hospital) against everyone outside the site",
        noise_added_by="the site, with Opacus' DP optimizer: per-task clipping of meta-gradients "
        "and Gaussian noise on their sum",
        server_sees="each site's privatized mean meta-gradient and its epsilon",
        sample_rate="tasks_per_client / tasks in the site's pool: each task joins the site's "
        "meta-batch independently with this probability (Poisson sampling inside the site)",
        dropouts="a site that is not sampled or drops out takes no step and spends nothing",
        accountant="one per site, persisted in the site's state across rounds; the site reports "
        "its own (epsilon, delta)",
    ),
}


def describe_mode(mode: str) -> ModeDescription:
    """The :class:`ModeDescription` of ``mode``.

    Raises:
        ConfigError: for an unknown mode.
    """
    try:
        return MODES[mode]
    except KeyError:
        raise ConfigError(f"config key 'privacy.mode' has no mode {mode!r} (known: {', '.join(MODES)})") from None


@dataclass(frozen=True)
class AccountingParameters:
    """What the accountant of a mode is stepped with, once per step.

    Attributes:
        noise_multiplier: the accountant's ``z`` (already adjusted for the mode's sensitivity
            and, with adaptive clipping, the effective multiplier of update and count together).
        sample_rate: the accountant's ``q``.
        unit: what one step protects: ``"client"`` or ``"task"``.
        steps_per_round: accountant steps per round a protected unit's owner takes part in
            (``meta.local_steps`` for task-level DP, 1 for client-level DP: one release a round).
    """

    noise_multiplier: float
    sample_rate: float
    unit: str
    steps_per_round: int = 1


def task_sample_rate(tasks_per_client: int, pool_size: int) -> float:
    """``min(1, tasks_per_client / pool_size)``: Poisson rate of a task in a site's meta-batch.

    Raises:
        ValueError: if ``pool_size`` is below 1.
    """
    if pool_size < 1:
        raise ValueError(f"a site needs at least one task, got pool_size={pool_size}")
    return min(1.0, tasks_per_client / pool_size)


def update_noise(cfg: Config) -> tuple[float, float]:
    """``(z_u, sigma_b)``: the noise multiplier on the update and the std of the count noise.

    Without adaptive clipping ``z_u`` is ``privacy.noise_multiplier`` and ``sigma_b`` is 0.
    """
    p = cfg.privacy
    if not p.adaptive_clipping:
        return p.noise_multiplier, 0.0
    sigma_b = p.count_stddev(cfg.federation.clients_per_round)
    return update_noise_multiplier(p.noise_multiplier, sigma_b), sigma_b


def _effective(cfg: Config) -> float:
    z_u, sigma_b = update_noise(cfg)
    if not cfg.privacy.adaptive_clipping:
        return z_u
    return effective_noise_multiplier(z_u, sigma_b)


def accounting_parameters(cfg: Config, *, pool_size: int | None = None) -> AccountingParameters | None:
    """The accountant parameters of ``cfg``'s privacy mode (``None`` for ``none``).

    Args:
        cfg: the run configuration.
        pool_size: for ``task`` mode, the number of tasks in the site's pool (defaults to
            ``task.tasks_per_site``).

    Raises:
        ConfigError: in ``task`` mode when the pool size is unknown.
    """
    p, f = cfg.privacy, cfg.federation
    if p.mode == "none":
        return None
    z = _effective(cfg)
    if p.mode == "client-central":
        return AccountingParameters(z, f.clients_per_round / f.clients_total, "client")
    if p.mode == "client-local":
        return AccountingParameters(z / LOCAL_SENSITIVITY_FACTOR, 1.0, "client")
    if p.mode == "task":
        pool = pool_size if pool_size is not None else cfg.task.tasks_per_site
        if pool is None:
            raise ConfigError(
                "privacy.mode 'task' needs the size of a site's task pool: set task.tasks_per_site "
                "(or point task.data_dir at the site folders so their tasks can be counted)"
            )
        # every local meta-step of a round is one DP-SGD step over the site's tasks
        return AccountingParameters(
            p.noise_multiplier, task_sample_rate(cfg.meta.tasks_per_client, pool), "task", steps_per_round=cfg.meta.local_steps
        )
    raise ConfigError(f"config key 'privacy.mode' has no mode {p.mode!r} (known: {', '.join(MODES)})")


def releasable_metrics(mode: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The training metrics a client may send along with its update under ``mode``.

    Loss and accuracy means over a client's tasks are computed from its data without noise, so
    they are not covered by the guarantee: under every DP mode they stay on the client and only
    keys starting with ``privacy.`` (noisy clip bits, the site's own epsilon, which depends on
    public parameters only) leave it. Without DP everything is sent.
    """
    if mode == "none":
        return dict(metrics)
    return {k: v for k, v in metrics.items() if k.startswith("privacy.")}
