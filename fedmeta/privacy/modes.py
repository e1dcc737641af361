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

Each mode is one class in :mod:`fedmeta.privacy.mechanisms` (its declarations, client side and
server side); this module keeps what they share (:class:`ModeDescription`,
:class:`AccountingParameters`, the noise arithmetic) and the mode-name functions older callers use
(:func:`describe_mode`, :func:`accounting_parameters`, :func:`releasable_metrics`), which ask the
mechanism. The full trust model (what each party sees, dropouts, what is not covered) is in
``docs/privacy.md``; :data:`MODES` carries the same facts for ``fedmeta privacy`` to print.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmeta.config import Config
from fedmeta.privacy.adaptive import effective_noise_multiplier, update_noise_multiplier

__all__ = [
    "ModeDescription",
    "MODES",  # noqa: F822 (module __getattr__: the mechanisms' descriptions)
    "describe_mode",
    "AccountingParameters",
    "accounting_parameters",
    "task_sample_rate",
    "update_noise",
    "effective_config_noise_multiplier",
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


def __getattr__(name: str) -> Any:
    """``MODES``: each registered mechanism's :class:`ModeDescription`, by mode (PEP 562).

    Looked up on use because the mechanisms import this module.
    """
    if name == "MODES":
        from fedmeta.privacy.mechanisms import MECHANISMS

        return {mode: mech.description for mode, mech in MECHANISMS.items()}
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def describe_mode(mode: str) -> ModeDescription:
    """The :class:`ModeDescription` of ``mode``.

    Raises:
        ConfigError: for an unknown mode.
    """
    from fedmeta.privacy.mechanisms import MECHANISMS

    return MECHANISMS.get(mode).description


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


def effective_config_noise_multiplier(cfg: Config) -> float:
    """The accountant's ``z`` for a round of ``cfg`` before any per-mode adjustment.

    ``privacy.noise_multiplier`` itself without adaptive clipping; with it, the effective
    multiplier of the update noise and the clipped-count noise together.
    """
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
        ConfigError: for an unknown mode, or in ``task`` mode when the pool size is unknown.
    """
    from fedmeta.privacy.mechanisms import mechanism_for

    return mechanism_for(cfg).accounting_parameters(cfg, pool_size=pool_size)


def releasable_metrics(mode: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """The training metrics a client may send along with its update under ``mode``.

    Loss and accuracy means over a client's tasks are computed from its data without noise, so
    they are not covered by the guarantee: under every DP mode they stay on the client and only
    keys starting with ``privacy.`` (noisy clip bits, the site's own epsilon, which depends on
    public parameters only) leave it. Without DP everything is sent.
    """
    from fedmeta.privacy.mechanisms import mechanism_for

    return mechanism_for(mode).releasable_metrics(metrics)
