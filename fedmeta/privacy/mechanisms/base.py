"""The privacy-mechanism interface and its registry: one class per ``privacy.mode``.

A mechanism declares what it protects (:attr:`PrivacyMechanism.unit`), who adds the noise
(:attr:`~PrivacyMechanism.noise_added_by`), what leaves a site (:attr:`~PrivacyMechanism.leaves_site`)
and what it is compatible with (aggregation rules, cohort sampling, objective terms), and it
implements both sides of the mode:

* **client side** — what a client does to its computed update or its task pool before replying
  (:meth:`~PrivacyMechanism.client_update`, :meth:`~PrivacyMechanism.privatize_update`) and which
  metrics it may release (:meth:`~PrivacyMechanism.releasable_metrics`);
* **server side** — cohort sampling, train instructions, aggregation, per-round accounting, epsilon
  and the ``summary.json`` entry, budget planning (:meth:`~PrivacyMechanism.accounting_parameters`).

Mechanisms are stateless: the state that lives as long as what it protects (accountants, the
adaptive clip norm, the sites' reports) stays in :class:`~fedmeta.privacy.facade.ServerPrivacy`
and :class:`~fedmeta.privacy.facade.ClientPrivacy`, which pass themselves in, so that checkpoints
and node states keep their format. A new mode is one module that registers itself::

    @MECHANISMS.register("distributed")
    class DistributedNoise(PrivacyMechanism): ...

plus its import in ``fedmeta/privacy/mechanisms/__init__.py`` and its test. Nothing outside this
package compares ``privacy.mode`` with a mode's name (``tests/unit/privacy/test_mechanisms.py``
checks it).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedmeta.privacy.modes import AccountingParameters, ModeDescription
from fedmeta.registry import Registry
from fedmeta.registry import require as _require
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.algorithms import MetaUpdate
    from fedmeta.config import Config
    from fedmeta.experiment import Experiment
    from fedmeta.privacy.accountant import PrivacyAccountant
    from fedmeta.privacy.facade import ClientPrivacy, ServerPrivacy
    from fedmeta.tasks import TaskSource

__all__ = [
    "PrivacyMechanism",
    "ClientSetup",
    "TrainInstruction",
    "RoundReplies",
    "RoundRelease",
    "MECHANISMS",
    "mechanism_for",
    "declarations_table",
    "CLIP_BIT_KEY",
    "CLIP_NORM_KEY",
    "UNITS",
    "NOISE_ADDERS",
]

#: Key under which a client-local client sends its noisy clip bit (adaptive clipping).
CLIP_BIT_KEY = "privacy.clip_bit"
#: Key under which the server sends the current clip norm in its train instructions.
CLIP_NORM_KEY = "privacy.clip_norm"

#: What one mechanism's guarantee is about.
UNITS = ("none", "client", "task")
#: Who adds the noise.
NOISE_ADDERS = ("nobody", "server", "client", "site")


@dataclass(frozen=True)
class ClientSetup:
    """What :meth:`PrivacyMechanism.init_client` sets a client's privacy state up from.

    Attributes:
        state: the client's saved privacy state (from its node state), to restore; ``None``: a fresh start.
        pool_size: the size of the client's task pool, if known (task-level DP needs it).
        rdp_cache: an RDP cache shared by the accountants of one process, if any.
    """

    state: Mapping[str, Any] | None = None
    pool_size: int | None = None
    rdp_cache: dict[tuple[float, float], Any] | None = None


@dataclass(frozen=True)
class TrainInstruction:
    """What a client is asked to train on, as :meth:`PrivacyMechanism.client_update` receives it.

    Attributes:
        meta: the meta-parameters received from the server (never modified).
        round_idx: the round (1-based).
        client_id: the client's id.
        clip_norm: the server's current clip norm (``None``: ``privacy.clip_norm``).
    """

    meta: Params
    round_idx: int
    client_id: int
    clip_norm: float | None = None


@dataclass(frozen=True)
class RoundReplies:
    """The replies of one round, as :meth:`PrivacyMechanism.aggregate` combines them.

    Attributes:
        round_idx: the round (1-based).
        updates: the validated updates (may be empty under client-central).
        reference: the meta-parameters (keys, shapes, dtypes).
        reports: each update's releasable metrics, aligned with ``updates`` (``None``: none were sent).
    """

    round_idx: int
    updates: Sequence[Params]
    reference: Params
    reports: Sequence[Mapping[str, Any]] | None = None


@dataclass(frozen=True)
class RoundRelease:
    """A round whose aggregate is released, as :meth:`PrivacyMechanism.account` accounts for it.

    Attributes:
        round_idx: the round (1-based).
        sampled: the clients sent train instructions this round.
        reports: each reporting client's releasable metrics, by client id (``None``: none were sent).
    """

    round_idx: int
    sampled: Sequence[int]
    reports: Mapping[int, Mapping[str, Any]] | None = None


class PrivacyMechanism:
    """One privacy mode: its declarations, its client side and its server side.

    Class attributes (the declarations; ``docs/privacy.md``'s summary table is checked against them):
        name: the ``privacy.mode`` value.
        unit: what is protected: ``"none"``, ``"client"`` or ``"task"``.
        noise_added_by: ``"nobody"``, ``"server"``, ``"client"`` or ``"site"``.
        leaves_site: one sentence: what a site sends to the server under this mode.
        description: the trust model in words (``fedmeta privacy`` prints it).
        aggregations: the ``federation.aggregation`` rules (names in
            :data:`fedmeta.aggregation.AGGREGATORS`) this mode accepts; ``None``: every rule.
        aggregations_why: why other rules are refused, in words (the config error says it).
        needs_poisson_sampling: whether the accountant assumes Poisson sampling of clients.
        accepts_non_separable_terms: whether an objective term that is not a sum over tasks may be used.
        supports_adaptive_clipping: whether ``privacy.adaptive_clipping`` applies.
        counts_site_pools: whether the accountant needs the size of a site's task pool.
        client_keeps_state: whether a client keeps its own accountant (in its node state, across rounds).
        batched_cohort: whether a cohort's updates may come from one vectorized pass (privatized per
            client afterwards) rather than from each site's own private steps.
        budget_holder: who a full-schedule epsilon is about, in words (budget messages).
    """

    name: ClassVar[str] = ""
    unit: ClassVar[str] = "none"
    noise_added_by: ClassVar[str] = "nobody"
    leaves_site: ClassVar[str] = ""
    description: ClassVar[ModeDescription]
    aggregations: ClassVar[tuple[str, ...] | None] = None
    aggregations_why: ClassVar[str] = ""
    needs_poisson_sampling: ClassVar[bool] = False
    accepts_non_separable_terms: ClassVar[bool] = True
    supports_adaptive_clipping: ClassVar[bool] = False
    counts_site_pools: ClassVar[bool] = False
    client_keeps_state: ClassVar[bool] = False
    batched_cohort: ClassVar[bool] = True
    budget_holder: ClassVar[str] = "the run"

    # -- declarations ----------------------------------------------------------------------------

    @property
    def enabled(self) -> bool:
        """Whether this mode is differential privacy at all (``False`` only for ``none``)."""
        return self.unit != "none"

    @property
    def per_participant_accounting(self) -> bool:
        """Whether epsilon is per client or site that takes part (rather than one for the run)."""
        return self.noise_added_by in ("client", "site")

    def accepts_aggregation(self, rule: str) -> bool:
        """Whether ``federation.aggregation: rule`` may be combined with this mode."""
        return self.aggregations is None or rule in self.aggregations

    def check_objective_terms(self, terms: Iterable[Any]) -> None:
        """Refuse objective terms this mode cannot protect.

        Args:
            terms: the run's extra objective terms (:class:`~fedmeta.algorithms.engine.ObjectiveTerm`:
                a ``name`` and a ``separable_per_task`` flag).

        Raises:
            ConfigError: naming the first non-separable term, when :attr:`accepts_non_separable_terms`
                is false.
        """
        if self.accepts_non_separable_terms:
            return
        from fedmeta.algorithms.engine import require_separable

        require_separable(
            list(terms),
            why=f"privacy.mode '{self.name}' clips every task's meta-gradient on its own, so each term must be a sum "
                "of "
            "per-task terms",
        )

    def check_config(self, cfg: Config) -> None:
        """Validate the privacy options that depend on this mode (config validation calls it).

        Checks the adaptive-clipping rules, then what the declarations ask of the federation:
        Poisson sampling (:attr:`needs_poisson_sampling`) and an accepted aggregation rule
        (:attr:`aggregations`, refused with :attr:`aggregations_why`).

        Raises:
            ConfigError: naming the key and the bad value.
        """
        self._check_adaptive_clipping(cfg)
        f = cfg.federation
        if self.needs_poisson_sampling:
            # The accountant's amplification by subsampling assumes each client joins a round
            # independently with probability q = clients_per_round / clients_total.
            _require(
                f.sampling == "poisson",
                "federation.sampling",
                f.sampling,
                f"must be 'poisson' for privacy.mode '{self.name}' (the privacy accountant assumes Poisson "
                "sampling of clients with rate clients_per_round / clients_total)",
            )
        if self.aggregations is not None:
            rules = " or ".join(f"'{rule}'" for rule in self.aggregations)
            _require(
                self.accepts_aggregation(f.aggregation),
                "federation.aggregation",
                f.aggregation,
                f"must be {rules} for privacy.mode '{self.name}' ({self.aggregations_why})",
            )

    def _check_adaptive_clipping(self, cfg: Config) -> None:
        # privacy.adaptive_clipping: only where the mode supports it, with enough clipped-count noise
        p, f = cfg.privacy, cfg.federation
        if p.adaptive_clipping:
            _require(
                self.supports_adaptive_clipping,
                "privacy.adaptive_clipping",
                p.adaptive_clipping,
                f"applies to privacy.mode client-central or client-local only (mode is '{p.mode}')",
            )
            count_std = p.count_stddev(f.clients_per_round)
            # Andrew et al. (2021), Thm. 1: the update noise left after paying for the noisy count is
            # (z^-2 - (2 sigma_b)^-2)^-1/2, which exists only when 2 sigma_b > z.
            _require(
                p.noise_multiplier == 0 or 2 * count_std > p.noise_multiplier,
                "privacy.clipped_count_stddev",
                count_std,
                f"must exceed privacy.noise_multiplier / 2 = {p.noise_multiplier / 2:g} for adaptive clipping "
                "(the clipped-count noise is paid out of the noise budget; null means "
                + self.default_count_stddev_means
                + ")",
            )

    #: What ``privacy.clipped_count_stddev: null`` means under this mode, in words.
    default_count_stddev_means: ClassVar[str] = "clients_per_round / 20"

    def default_count_stddev(self, noise_multiplier: float, clients_per_round: int) -> float:
        """The clipped-count noise std of adaptive clipping when ``privacy.clipped_count_stddev`` is null."""
        return clients_per_round / 20.0

    # -- budget planning -------------------------------------------------------------------------

    def accounting_parameters(self, cfg: Config, *, pool_size: int | None = None) -> AccountingParameters | None:
        """What this mode's accountant is stepped with (``None``: nothing is accounted).

        Raises:
            ConfigError: when a parameter the accountant needs is unknown (task: the pool size).
        """
        return None

    def noise_multiplier_for(self, accounted: float) -> float:
        """``privacy.noise_multiplier`` whose accountant ``z`` is ``accounted`` (calibration)."""
        return accounted

    def site_pool_size(self, source: TaskSource, client_id: int) -> int | None:
        """The size of ``client_id``'s task pool if this mode accounts per task (else ``None``)."""
        return None

    # -- client side -----------------------------------------------------------------------------

    def init_client(self, client: ClientPrivacy, setup: ClientSetup) -> None:
        """Set up a client's privacy state (its own accountant, if the mode gives it one) from ``setup``.

        Raises:
            ConfigError: when the mode needs something the client does not know (task: its pool size).
        """

    def privatize_update(
        self, client: ClientPrivacy, update: Params, *, round_idx: int, clip_norm: float | None
    ) -> tuple[Params, dict[str, float]]:
        """What ``client`` sends for its mean meta-update, and the ``privacy.*`` scalars sent with it.

        By default the update leaves unchanged (nobody, or the trusted server, adds the noise).

        Raises:
            BudgetExhausted: if the client's own budget would be exceeded.
            ValueError: if the mode privatizes something else (task: per-task gradients).
        """
        return update, {}

    def privatize_client_update(
        self, cfg: Config, client: ClientPrivacy, update: MetaUpdate, *, round_idx: int, clip_norm: float | None = None
    ) -> tuple[MetaUpdate, dict[str, float]]:
        """Turn a client's computed update into what it may send (see :meth:`privatize_update`).

        Under DP the sent update carries no training metrics and the nominal task count
        (:func:`~fedmeta.privacy.client_update.nominal_num_tasks`).
        """
        from fedmeta.algorithms import MetaUpdate
        from fedmeta.privacy.client_update import nominal_num_tasks

        sent, extra = client.privatize_update(update.gradient, round_idx=round_idx, clip_norm=clip_norm)
        return MetaUpdate(sent, nominal_num_tasks(cfg), {}), self.releasable_metrics(extra)

    def client_update(
        self, exp: Experiment, client: ClientPrivacy, train: TrainInstruction
    ) -> tuple[MetaUpdate, dict[str, float]]:
        """Everything a client computes for a train instruction: its update, then :meth:`privatize_client_update`.

        Returns:
            The update to send and the releasable metrics to send with it.
        """
        update = exp.client_update(train.meta, train.round_idx, train.client_id)
        return self.privatize_client_update(
            exp.cfg, client, update, round_idx=train.round_idx, clip_norm=train.clip_norm
        )

    def releasable_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """The training metrics a client may send with its update.

        Under every DP mode only ``privacy.*`` keys (noisy clip bits, the site's own epsilon, a
        function of public parameters) leave the client: loss and accuracy means are computed from
        its data without noise, so the guarantee does not cover them.
        """
        return {k: v for k, v in metrics.items() if k.startswith("privacy.")}

    # -- server side -----------------------------------------------------------------------------

    def server_accountant(self, cfg: Config) -> PrivacyAccountant | None:
        """The server's one accountant for the run, if this mode has one."""
        return None

    def rounds_to_run(self, server: ServerPrivacy) -> int:
        """Rounds the run may take under ``privacy.target_epsilon`` (see :func:`enforce_budget`).

        Planned on top of what the server's state has already spent (a resumed run's checkpoint).

        Raises:
            BudgetExhausted: if the schedule exceeds the target and the run must not start.
        """
        from fedmeta.privacy.budget import enforce_budget

        return enforce_budget(
            server.cfg, pool_size=server.pool_size, history=server.spent_history(), rounds_done=server.rounds_completed
        )

    def sample_clients(self, server: ServerPrivacy, round_idx: int) -> list[int]:
        """The cohort of ``round_idx``: as ``federation.sampling`` says, from the run seed."""
        from fedmeta.sampling import sample_clients

        f = server.cfg.federation
        return sample_clients(server.cfg.seed, round_idx, f.clients_total, f.clients_per_round, method=f.sampling)

    def client_config(self, server: ServerPrivacy, round_idx: int) -> dict[str, float]:
        """Scalars for the train instructions of ``round_idx`` (the current clip norm under DP)."""
        return {CLIP_NORM_KEY: server.clip.clip_norm} if self.enabled else {}

    def aggregate(self, server: ServerPrivacy, replies: RoundReplies, info: dict[str, Any]) -> Params:
        """The round's aggregate of already private updates: ``federation.aggregation``, unweighted.

        Args:
            server: the server's privacy state (its clip state may move).
            replies: the round's validated updates, the meta-parameters and the updates' reports.
            info: the round's ``privacy`` metrics entry, filled in place.

        Raises:
            ValueError: if there is nothing to aggregate.
        """
        from fedmeta.aggregation import aggregate, stack

        updates = replies.updates
        if not updates:
            raise ValueError(f"round {replies.round_idx}: no updates to aggregate")
        weights = torch.ones(len(updates), dtype=torch.float64)
        f = server.cfg.federation
        return aggregate(stack(list(updates)), weights, method=f.aggregation, trim_fraction=f.trim_fraction)

    @staticmethod
    def move_clip(server: ServerPrivacy, unclipped_fraction: float | None, info: dict[str, Any]) -> None:
        """Adaptive clipping: move the server's clip norm by a round's noisy unclipped fraction, and record it.

        Args:
            server: the server's privacy state (its clip state moves).
            unclipped_fraction: the round's noisy fraction of updates that were not clipped (``None``:
                nothing arrived to estimate it from; the clip norm stays).
            info: the round's ``privacy`` metrics entry (gets ``unclipped_fraction``).
        """
        server.clip = server.clip.updated(unclipped_fraction)
        info["unclipped_fraction"] = unclipped_fraction

    def account(self, server: ServerPrivacy, release: RoundRelease) -> None:
        """Step the server's accountant(s), or record the sites' reports, for one released round."""

    def round_entry(self, server: ServerPrivacy) -> dict[str, Any]:
        """Mode-specific entries of a round's ``privacy`` metrics (before epsilon)."""
        return {}

    def epsilon(self, server: ServerPrivacy) -> float:
        """Epsilon spent so far, as the server knows it (0 without DP)."""
        return 0.0

    def summary_entry(self, server: ServerPrivacy) -> dict[str, Any]:
        """Mode-specific entries of ``summary.json``'s ``privacy`` section."""
        return {}


#: The privacy mechanisms, by their ``privacy.mode`` name (filled by the mode modules).
MECHANISMS = Registry[type[PrivacyMechanism]]("mode", key="privacy.mode")


def mechanism_for(cfg: Config | str) -> PrivacyMechanism:
    """The mechanism of ``cfg.privacy.mode`` (or of a mode name).

    Raises:
        ConfigError: for an unknown mode, naming ``privacy.mode`` and the known modes.
    """
    mode = cfg if isinstance(cfg, str) else cfg.privacy.mode
    return MECHANISMS.get(mode)()



def declarations_table() -> str:
    """The mechanisms' declarations as the Markdown table ``docs/privacy.md`` shows (a test keeps them equal).

    Returns:
        One header row, one rule and one row per registered mode: mode, unit protected, who adds
        the noise, what leaves a site.
    """
    rows = ["| `privacy.mode` | unit protected | noise added by | what leaves a site |", "| --- | --- | --- | --- |"]
    for name, mech in MECHANISMS.items():
        rows.append(f"| `{name}` | {mech.unit} | {mech.noise_added_by} | {mech.leaves_site} |")
    return "\n".join(rows)
