"""``privacy.mode: client-distributed``: each client adds a share of the noise; the server sees only the sum.

Distributed DP under secure aggregation (Kairouz, Liu and Steinke, 2021, "The Distributed
Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation", here with
continuous Gaussian shares and SecAgg+'s fixed point, Bell et al., 2020): every client clips its
mean meta-update to ``C`` and adds ``N(0, (sigma C)^2 / t)`` per coordinate, ``t`` the fewest
clients whose masked updates must survive (``privacy.min_survivors``). The updates are summed
under secure aggregation (Flower's SecAgg+ in a Flower run; the same fixed-point arithmetic in
process for the centralized reference), so the server only ever holds the sum of ``n >= t``
noisy updates, whose noise has std ``sigma C sqrt(n / t) >= sigma C``.

Server side: the unmasked sum is checked (:func:`~fedmeta.privacy.secure_sum.check_sum`), then
divided by the fixed ``clients_per_round``; one accountant per run is stepped once per released
round with ``z = sigma sqrt(n / t)`` at ``q = 1``. A round with fewer than ``t`` survivors, or
whose protocol halted, releases nothing and is refused (the run stops with
:class:`~fedmeta.errors.InconsistentReplies`; its checkpoint keeps the round before).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedmeta.privacy.accountant import PrivacyAccountant
from fedmeta.privacy.clipping import privatize_update
from fedmeta.privacy.mechanisms.base import MECHANISMS, PrivacyMechanism, RoundRelease
from fedmeta.privacy.modes import AccountingParameters, ModeDescription
from fedmeta.registry import require as _require
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.algorithms import MetaUpdate
    from fedmeta.config import Config
    from fedmeta.federation.stages import Stage
    from fedmeta.privacy.facade import ClientPrivacy, ServerPrivacy
    from fedmeta.privacy.secure_sum import FixedPoint

__all__ = ["ClientDistributedPrivacy", "default_min_survivors", "survivor_noise_multiplier"]

#: Key of the round's survivor count in :attr:`ServerPrivacy.round_info` (set by the sum stage).
SURVIVORS = "survivors"


def default_min_survivors(clients_per_round: int) -> int:
    """``privacy.min_survivors: null``: ``max(2, ceil(2 m / 3))`` for a cohort of ``m``.

    Two thirds of the cohort tolerates a third dropping out while keeping the released noise within
    ``sqrt(3/2)`` of the configured ``sigma`` (at full participation, ``n = m``).
    """
    return max(2, math.ceil(2 * clients_per_round / 3))


def survivor_noise_multiplier(noise_multiplier: float, *, survivors: int, threshold: int) -> float:
    """The noise multiplier of a sum of ``n`` updates whose shares were sized for ``t``: ``sigma sqrt(n / t)``.

    Raises:
        ValueError: if ``survivors`` is below ``threshold`` (such a sum is never released).
    """
    if survivors < threshold or threshold < 1:
        raise ValueError(f"a sum of {survivors} updates is below the threshold t={threshold}: it is never released")
    return noise_multiplier * math.sqrt(survivors / threshold)


@MECHANISMS.register("client-distributed")
class ClientDistributedPrivacy(PrivacyMechanism):
    """Client-level DP against the server: each client adds a noise share; SecAgg+ hides each update.

    What leaves a site: its clipped update with a share of the noise, masked by SecAgg+ (only the sum
    of at least t such updates is ever unmasked), the protocol's keys and secret shares, a fixed
    weight of 1, and no metrics or task count.
    """

    name = "client-distributed"
    unit = "client"
    noise_added_by = "clients"
    leaves_site = (
        "its clipped update with a share of the noise, masked by SecAgg+ (only the sum of at least t such "
        "updates is ever unmasked), the protocol's keys and secret shares, a fixed weight of 1, and no metrics "
        "or task count"
    )
    description = ModeDescription(
        name="client-distributed",
        protects="a whole client, against the server (honest but curious) and anyone who sees its messages, "
        "as long as at least privacy.min_survivors clients of the round follow the protocol",
        noise_added_by="every client: N(0, (sigma C)^2 / t) on its own clipped update, t = privacy.min_survivors; "
        "the shares of the n >= t survivors add up to std sigma C sqrt(n / t) >= sigma C",
        server_sees="only the unmasked sum of the survivors' noisy updates (SecAgg+), who was asked and how "
        "many survived; never an individual update, metric or task count",
        sample_rate="1: the server chooses the cohort and sees who survived, so sampling gives no "
        "amplification against it; zero-out adjacency (a client's update replaced by zero), sensitivity C",
        dropouts="a client that drops out takes its noise share with it: a round with n >= t survivors "
        "is accounted at sigma sqrt(n / t); one with fewer, or whose protocol halted, releases nothing and "
        "stops the run (the checkpoint keeps the round before)",
        accountant="one per run on the server, stepped once per released round, saved in checkpoint.pt",
    )
    aggregations = ("mean",)
    aggregations_why = "the server receives only the sum of the updates, which it divides by clients_per_round"
    accepts_update_relations = False
    secure_sum = True
    pools_clients = False  # SecAgg+ masks per node: each client keeps its own simulation node
    public = (
        "privacy.noise_multiplier",
        "privacy.clip_norm",
        "privacy.min_survivors",
        "privacy.delta",
        "privacy.accountant",
        "federation.clients_per_round",
        "who was asked to take part in a round and how many survived",
    )

    # -- configuration ---------------------------------------------------------------------------

    def min_survivors(self, cfg: Config) -> int:
        """``privacy.min_survivors``, or :func:`default_min_survivors` of the cohort when null."""
        t = cfg.privacy.min_survivors
        return default_min_survivors(cfg.federation.clients_per_round) if t is None else int(t)

    def check_config(self, cfg: Config) -> None:
        """The base rules, then what a secure sum needs: uniform cohorts, a threshold, a bounded cohort.

        Raises:
            ConfigError: naming the key (``meta.trlearner.federated``, ``federation.sampling``,
                ``federation.clients_per_round``, ``privacy.min_survivors``, ...).
        """
        from fedmeta.privacy.secure_sum import max_cohort

        f, p = cfg.federation, cfg.privacy
        _require(
            cfg.meta.trlearner.federated == "off",
            "meta.trlearner.federated",
            cfg.meta.trlearner.federated,
            f"must be 'off' for privacy.mode '{self.name}': the server receives only the sum of the updates under "
            "secure aggregation, and TRLearner's federated variant needs each client's update",
        )
        super().check_config(cfg)
        _require(
            f.sampling == "uniform",
            "federation.sampling",
            f.sampling,
            f"must be 'uniform' for privacy.mode '{self.name}': the server that samples knows the cohort, so Poisson "
            "sampling gives no amplification against it (accounted at q = 1), and a Poisson cohort below "
            "privacy.min_survivors could not be summed",
        )
        _require(
            2 <= f.clients_per_round <= max_cohort(),
            "federation.clients_per_round",
            f.clients_per_round,
            f"must lie in [2, {max_cohort()}] for privacy.mode '{self.name}' (a secure sum of m updates of Q >= "
            "2**16 levels modulo 2**32 needs m x Q < 2**32)",
        )
        t = p.min_survivors
        _require(
            t is None or (isinstance(t, int) and not isinstance(t, bool) and 2 <= t <= f.clients_per_round),
            "privacy.min_survivors",
            t,
            f"must be an integer in [2, federation.clients_per_round={f.clients_per_round}] (null: "
            f"{default_min_survivors(f.clients_per_round)})",
        )

    def fixed_point(self, cfg: Config, reference: Params) -> FixedPoint:
        """SecAgg+'s ranges for this run (:func:`~fedmeta.privacy.secure_sum.fixed_point_for`); both sides agree."""
        from fedmeta.privacy.secure_sum import fixed_point_for

        p = cfg.privacy
        dimension = int(sum(v.numel() for v in reference.values()))
        return fixed_point_for(
            clip_norm=p.clip_norm,
            noise_multiplier=p.noise_multiplier,
            threshold=self.min_survivors(cfg),
            dimension=dimension,
            cohort=cfg.federation.clients_per_round,
        )

    # -- budget planning -------------------------------------------------------------------------

    def accounting_parameters(self, cfg: Config, *, pool_size: int | None = None) -> AccountingParameters:
        """``sigma`` (the noise of exactly ``t`` survivors, the least a released round carries) at ``q = 1``."""
        return AccountingParameters(cfg.privacy.noise_multiplier, 1.0, "client")

    # -- client side -----------------------------------------------------------------------------

    def privatize_update(
        self, client: ClientPrivacy, update: Params, *, round_idx: int, clip_norm: float | None
    ) -> tuple[Params, dict[str, float]]:
        """``clip(u, C) + N(0, (sigma C)^2 / t)`` with the client's own ``C`` (the server's is ignored).

        The fixed point is derived from ``C``, so a clip norm chosen by the server would change the
        encoding the server unmasks with; the client keeps ``privacy.clip_norm``. Nothing else is sent.
        """
        from fedmeta.privacy.clipping import noise_share_std

        cfg = client.cfg
        c = cfg.privacy.clip_norm
        std = noise_share_std(
            noise_multiplier=cfg.privacy.noise_multiplier, clip_norm=c, num_shares=self.min_survivors(cfg)
        )
        noisy, _ = privatize_update(update, clip_norm=c, noise_std=std, generator=client.generator("noise", round_idx))
        return noisy, {}

    def privatize_client_update(
        self, cfg: Config, client: ClientPrivacy, update: MetaUpdate, *, round_idx: int, clip_norm: float | None = None
    ) -> tuple[MetaUpdate, dict[str, float]]:
        """The noisy update with weight 1 and no metrics (see :meth:`privatize_update`)."""
        from fedmeta.algorithms import MetaUpdate

        sent, _ = self.privatize_update(client, update.gradient, round_idx=round_idx, clip_norm=clip_norm)
        return MetaUpdate(sent, 1, {}), {}

    def releasable_metrics(self, metrics: Any) -> dict[str, Any]:
        """Nothing: no per-client scalar leaves a site, not even ``privacy.*`` ones."""
        return {}

    # -- server side -----------------------------------------------------------------------------

    def server_accountant(self, cfg: Config) -> PrivacyAccountant:
        """One accountant for the run, on the server."""
        return PrivacyAccountant(cfg.privacy.accountant)

    def server_stages(self, server: ServerPrivacy) -> list[Stage]:
        """``sum`` (checks on the unmasked sum) -> ``mean`` (divide by ``clients_per_round``)."""
        from fedmeta.privacy.stages import SecureMeanStage, SecureSumStage

        return [SecureSumStage(server), SecureMeanStage(server)]

    def account(self, server: ServerPrivacy, release: RoundRelease) -> None:
        """One step at ``z = sigma sqrt(n / t)``, ``q = 1``, for a round whose sum was unmasked.

        A round whose sum failed the server's checks was still unmasked (the server saw it): it is
        accounted too.
        """
        assert server.accountant is not None
        n = server.round_info.get(SURVIVORS)
        if n is None:
            return
        t = self.min_survivors(server.cfg)
        z = survivor_noise_multiplier(server.cfg.privacy.noise_multiplier, survivors=int(n), threshold=t)
        server.accountant.step(noise_multiplier=z, sample_rate=1.0)

    def round_entry(self, server: ServerPrivacy) -> dict[str, Any]:
        """``q = 1``, ``t`` and the noise multiplier the round was accounted at (``sigma sqrt(n / t)``)."""
        t = self.min_survivors(server.cfg)
        out: dict[str, Any] = {"sample_rate": 1.0, "min_survivors": t}
        n = server.round_info.get(SURVIVORS)
        if n is not None:
            out["accounted_noise_multiplier"] = survivor_noise_multiplier(
                server.cfg.privacy.noise_multiplier, survivors=int(n), threshold=t
            )
        return out

    def epsilon(self, server: ServerPrivacy) -> float:
        """The run's epsilon."""
        assert server.accountant is not None
        return server.accountant.get_epsilon(server.cfg.privacy.delta)

    def summary_entry(self, server: ServerPrivacy) -> dict[str, Any]:
        """``q = 1`` and ``t``."""
        return {"sample_rate": 1.0, "min_survivors": self.min_survivors(server.cfg)}
