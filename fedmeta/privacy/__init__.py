"""Differential privacy for meta-gradients, in three layers (Opacus-style).

1. Pure functions: :mod:`~fedmeta.privacy.clipping` (global-L2 clipping over all meta-parameters,
   Meta-SGD rates included; Gaussian noise from a passed generator), :mod:`~fedmeta.privacy.adaptive`
   (quantile-based adaptive clipping, Andrew et al., 2021).
2. Accounting: :class:`PrivacyAccountant` wraps Opacus' ``rdp`` / ``prv`` / ``gdp`` accountants;
   :mod:`~fedmeta.privacy.budget` plans budgets and calibrates sigma with Opacus.
3. The modes: :mod:`fedmeta.privacy.mechanisms`, one :class:`PrivacyMechanism` per
   ``privacy.mode`` (registered in ``fedmeta.privacy.mechanisms.MECHANISMS``; not to be confused
   with :data:`MECHANISMS` here, the Opacus accountants), each declaring what it protects, who adds
   the noise, what leaves a site and what it is compatible with, and implementing its client and
   server side; :func:`mechanism_for` gives a config's.
4. The facade used by server and client: :class:`ServerPrivacy`, :class:`ClientPrivacy`, which
   hold the state (accountants, clip norm) and delegate to the mechanism (task-level DP inside a
   site runs through Opacus' ``DPOptimizer``: :class:`TaskLevelPrivacy`).

What each mode protects, who adds the noise and what ``sample_rate`` means:
:data:`MODES` and ``docs/privacy.md``. Importing this package does not import Opacus (6-9 s);
the first epsilon does.
"""

from __future__ import annotations

from fedmeta.privacy.accountant import MECHANISMS, PrivacyAccountant, epsilon_for
from fedmeta.privacy.adaptive import AdaptiveClipState, effective_noise_multiplier, update_noise_multiplier
from fedmeta.privacy.budget import (
    BudgetTarget,
    PrivacyPlan,
    calibrate_config_noise_multiplier,
    calibrate_noise_multiplier,
    enforce_budget,
    plan_privacy,
    rounds_that_fit,
)
from fedmeta.privacy.clipping import (
    add_gaussian_noise,
    central_private_mean,
    clip_by_global_norm,
    clipped_sum,
    gaussian_noise,
    global_l2_norm,
    noise_share_std,
    privatize_update,
)
from fedmeta.privacy.facade import CLIP_BIT_KEY, CLIP_NORM_KEY, ClientPrivacy, ServerPrivacy
from fedmeta.privacy.mechanisms import PrivacyMechanism, mechanism_for
from fedmeta.privacy.modes import (
    MODES,
    AccountingParameters,
    ModeDescription,
    accounting_parameters,
    describe_mode,
    releasable_metrics,
    task_sample_rate,
)
from fedmeta.privacy.randomness import privacy_generator, secret_seed
from fedmeta.privacy.task_level import TaskLevelPrivacy, poisson_indices, sample_site_tasks, site_pool_size

__all__ = [
    "MECHANISMS",
    "MODES",
    "AccountingParameters",
    "AdaptiveClipState",
    "CLIP_BIT_KEY",
    "CLIP_NORM_KEY",
    "ClientPrivacy",
    "ModeDescription",
    "PrivacyAccountant",
    "PrivacyMechanism",
    "BudgetTarget",
    "PrivacyPlan",
    "ServerPrivacy",
    "TaskLevelPrivacy",
    "accounting_parameters",
    "add_gaussian_noise",
    "calibrate_config_noise_multiplier",
    "calibrate_noise_multiplier",
    "central_private_mean",
    "clip_by_global_norm",
    "clipped_sum",
    "describe_mode",
    "effective_noise_multiplier",
    "enforce_budget",
    "epsilon_for",
    "gaussian_noise",
    "global_l2_norm",
    "mechanism_for",
    "noise_share_std",
    "plan_privacy",
    "poisson_indices",
    "privacy_generator",
    "privatize_update",
    "releasable_metrics",
    "rounds_that_fit",
    "sample_site_tasks",
    "secret_seed",
    "site_pool_size",
    "task_sample_rate",
    "update_noise_multiplier",
]
