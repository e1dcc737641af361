"""The privacy-mechanism interface and its registry: one class per ``privacy.mode``.

A mechanism declares what it protects (:attr:`PrivacyMechanism.unit`), who adds the noise
(:attr:`~PrivacyMechanism.noise_added_by`), what leaves a site (:attr:`~PrivacyMechanism.leaves_site`)
and what it is compatible with (aggregation rules, cohort sampling, objective terms), and it
implements both sides of the mode:

* **client side** — what a client does to its computed update or its task pool before replying
  (:meth:`~PrivacyMechanism.client_update`, :meth:`~PrivacyMechanism.privatize_update`) and which
  metrics it may release (:meth:`~PrivacyMechanism.releasable_metrics`);
* **server side** — cohort sampling, train instructions, the server stages that aggregate
  (:meth:`~PrivacyMechanism.server_stages`, e.g. client-central's clip, sum, noise and mean),
  per-round accounting, epsilon and the ``summary.json`` entry, budget planning
  (:meth:`~PrivacyMechanism.accounting_parameters`).

Mechanisms are stateless: the state that lives as long as what it protects (accountants, the
sites' reports) stays in :class:`~fedmeta.privacy.facade.ServerPrivacy` and
:class:`~fedmeta.privacy.facade.ClientPrivacy`, which pass themselves in, so that checkpoints and
node states keep their format; the clip norm lives in the one server stage that owns it, saved
under its name. A new mode is one module that registers itself::

    @MECHANISMS.register("distributed")
    class DistributedNoise(PrivacyMechanism): ...

plus its import in ``fedmeta/privacy/mechanisms/__init__.py`` and its test. Nothing outside this
package compares ``privacy.mode`` with a mode's name (``tests/unit/privacy/test_mechanisms.py``
checks it).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from fedmeta.privacy.modes import AccountingParameters, ModeDescription
from fedmeta.registry import Registry
from fedmeta.registry import require as _require
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.algorithms import MetaUpdate
    from fedmeta.config import Config
    from fedmeta.experiment import Experiment
    from fedmeta.federation.stages import Stage
    from fedmeta.privacy.accountant import PrivacyAccountant
    from fedmeta.privacy.facade import ClientPrivacy, ServerPrivacy
    from fedmeta.privacy.secure_sum import FixedPoint
    from fedmeta.tasks import TaskSource

__all__ = [
    "PrivacyMechanism",
    "ClientSetup",
    "TrainInstruction",
    "RoundRelease",
    "MECHANISMS",
    "mechanism_for",
    "declarations_table",
    "CLIP_BIT_KEY",
    "CLIP_NORM_KEY",
    "UNITS",
    "NOISE_ADDERS",
]

log = logging.getLogger(__name__)

#: Key under which a client-local client sends its noisy clip bit (adaptive clipping).
CLIP_BIT_KEY = "privacy.clip_bit"
#: Key under which the server sends the current clip norm in its train instructions.
CLIP_NORM_KEY = "privacy.clip_norm"

#: What one mechanism's guarantee is about.
UNITS = ("none", "client", "task")
#: Who adds the noise.
NOISE_ADDERS = ("nobody", "server", "client", "clients", "site")


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
        accepts_update_relations: whether the server may weight clients by relations it derives from
            their updates (TRLearner's federated variant): only where each update reaching the server
            is already privatized (or nothing is private), so the weights are post-processing.
        supports_adaptive_clipping: whether ``privacy.adaptive_clipping`` applies.
        counts_site_pools: whether the accountant needs the size of a site's task pool.
        client_keeps_state: whether a client keeps its own accountant (in its node state, across rounds).
        batched_cohort: whether a cohort's updates may come from one vectorized pass (privatized per
            client afterwards) rather than from each site's own private steps.
        budget_holder: who a full-schedule epsilon is about, in words (budget messages).
        public: the config keys (and facts) this mode's guarantee treats as public: what a site's
            releases may depend on besides its noised data.
        reports_task_count: whether a site's start-up answer carries how many tasks it holds (only
            without DP: under DP the count is the site's data, and nothing needs it).
        evaluates_on_site_data: whether evaluation may use the sites' data without noise: federated
            evaluation (``eval.clients > 0``: each site's held-out means) and the server evaluating on
            the clients' own site folders (``task.data_dir``'s ``heldout/`` tasks). No DP mode
            allows it: those metrics would not be covered by epsilon.
        accepts_shared_sites: whether ``task.share_sites`` (several clients reading one site folder)
            may be used; no DP mode accepts it (one site entering as several clients is not the unit).
        secure_sum: whether the server receives only the sum of the cohort's updates (secure
            aggregation): the transports deliver one :class:`~fedmeta.privacy.secure_sum.SecureSum`
            per round instead of per-client replies, and nothing may need an individual update.
        pools_clients: whether a simulation node may play several logical clients
            (``simulation.pool``); a protocol that treats each node as one party (secure
            aggregation) sets ``False``, and ``fedmeta simulate`` then refuses the pool.
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
    accepts_update_relations: ClassVar[bool] = True
    supports_adaptive_clipping: ClassVar[bool] = False
    counts_site_pools: ClassVar[bool] = False
    client_keeps_state: ClassVar[bool] = False
    batched_cohort: ClassVar[bool] = True
    budget_holder: ClassVar[str] = "the run"
    accepts_shared_sites: ClassVar[bool] = False
    evaluates_on_site_data: ClassVar[bool] = False
    public: ClassVar[tuple[str, ...]] = ()
    reports_task_count: ClassVar[bool] = False
    secure_sum: ClassVar[bool] = False
    pools_clients: ClassVar[bool] = True

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

    def with_declared_defaults(self, cfg: Config, *, given: Collection[str]) -> Config:
        """Fill in the options this mode's declarations imply where the config did not set them.

        With :attr:`needs_poisson_sampling`, a config that leaves ``federation.sampling`` at its
        default takes ``poisson`` (and says so in the log) instead of being refused; one that asks
        for another sampling explicitly is still refused by :meth:`check_config`.

        Args:
            cfg: the config as built from the file and overrides (not yet validated).
            given: the dotted keys the config's source set explicitly.

        Returns:
            ``cfg``, or a copy with the implied options.
        """
        if self.needs_poisson_sampling and "federation.sampling" not in given and cfg.federation.sampling != "poisson":
            log.info(
                "privacy.mode '%s' assumes Poisson sampling of clients (rate clients_per_round / clients_total): "
                "federation.sampling, not set in the config, is 'poisson'",
                self.name,
            )
            return dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, sampling="poisson"))
        return cfg

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
        _require(
            self.accepts_shared_sites or not cfg.task.share_sites,
            "task.share_sites",
            cfg.task.share_sites,
            f"must be false for privacy.mode '{self.name}': clients sharing a site folder would let one site's "
            f"data enter as several clients, and the {self.unit}-level epsilon would protect the wrong unit",
        )
        self._check_evaluation(cfg)
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
        federated = cfg.meta.trlearner.federated
        _require(
            federated == "off" or self.accepts_update_relations,
            "meta.trlearner.federated",
            federated,
            f"must be 'off' for privacy.mode '{self.name}': the server receives the clients' updates before "
            "they are noised, and weights derived from them would change each client's sensitivity",
        )
        if self.aggregations is not None:
            rules = " or ".join(f"'{rule}'" for rule in self.aggregations)
            _require(
                self.accepts_aggregation(f.aggregation),
                "federation.aggregation",
                f.aggregation,
                f"must be {rules} for privacy.mode '{self.name}' ({self.aggregations_why})",
            )

    def _check_evaluation(self, cfg: Config) -> None:
        # evaluation on the sites' own data is un-noised: refused under DP (evaluates_on_site_data)
        if self.evaluates_on_site_data:
            return
        e, t = cfg.eval, cfg.task
        _require(
            e.clients == 0,
            "eval.clients",
            e.clients,
            f"must be 0 under privacy.mode '{self.name}': federated evaluation sends each site's held-out loss "
            "and accuracy means without noise, outside epsilon (the server evaluates on held-out tasks of its own: "
            "eval.server)",
        )
        _require(
            not (t.name == "folder" and e.server and t.data_dir and not e.data_dir),
            "eval.data_dir",
            e.data_dir,
            f"must name held-out sites that no client reads for server-side evaluation over site folders under "
            f"privacy.mode '{self.name}': task.data_dir's heldout/ tasks are the sites' own data, and metrics on "
            "them are not covered by epsilon",
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

    def min_survivors(self, cfg: Config) -> int | None:
        """``t``: the fewest updates a secure sum may hold (``None``: this mode has no secure sum)."""
        return None

    def fixed_point(self, cfg: Config, reference: Params) -> FixedPoint | None:
        """The fixed-point encoding of this mode's secure sums for updates like ``reference`` (``None``: none)."""
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

    def server_stages(self, server: ServerPrivacy) -> list[Stage]:
        """This mode's part of the server chain (:mod:`fedmeta.privacy.stages`), in order.

        :class:`~fedmeta.privacy.facade.ServerPrivacy` builds it once per run and the round loop runs
        it where the aggregation goes (after the reply transforms, before the aggregate transforms).
        By default: ``federation.aggregation``, unweighted, over the already private updates (an
        empty cohort gives no aggregate). A stage that owns the clip norm (a
        :class:`~fedmeta.privacy.stages.ClipNormStage`, at most one) makes it the norm sent to the
        clients and saved under the stage's name.

        Args:
            server: the run's privacy state, which the stages read (noise constants, secret seed) and
                fill (the round's ``privacy`` entries).
        """
        from fedmeta.privacy.stages import RuleAggregationStage

        return [RuleAggregationStage(server)]

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
