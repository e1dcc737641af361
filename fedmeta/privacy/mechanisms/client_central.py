"""``privacy.mode: client-central``: a trusted server clips, noises and accounts (DP-FedAvg).

McMahan et al. (2018), "Learning Differentially Private Recurrent Language Models": the server
samples clients by Poisson sampling from a secret seed, clips every reply to ``C``, adds
``N(0, (z C)^2)`` to the sum and divides by the expected cohort size — four server stages
(:mod:`fedmeta.privacy.stages`) — and keeps one accountant per run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedmeta.privacy.accountant import PrivacyAccountant
from fedmeta.privacy.mechanisms.base import MECHANISMS, PrivacyMechanism, RoundRelease
from fedmeta.privacy.modes import AccountingParameters, ModeDescription, effective_config_noise_multiplier

if TYPE_CHECKING:
    from fedmeta.config import Config
    from fedmeta.federation.stages import Stage
    from fedmeta.privacy.facade import ServerPrivacy

__all__ = ["ClientCentralPrivacy"]


@MECHANISMS.register("client-central")
class ClientCentralPrivacy(PrivacyMechanism):
    """Client-level DP with a trusted server: the server adds the noise to the sum of clipped updates.

    What leaves a site: its raw mean meta-update (the server is trusted), a nominal task count and no
    training metrics.
    """

    name = "client-central"
    unit = "client"
    noise_added_by = "server"
    leaves_site = "its raw mean meta-update (the server is trusted), a nominal task count and no training metrics"
    description = ModeDescription(
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
    )
    #: the noise is calibrated to the clipped sum, which only the mean divides by a fixed count
    aggregations = ("mean",)
    aggregations_why = "the noise is calibrated to the clipped sum"
    needs_poisson_sampling = True
    #: relation weights from raw updates would change each client's sensitivity (issue 18)
    accepts_update_relations = False
    supports_adaptive_clipping = True
    public = (
        "privacy.noise_multiplier",
        "privacy.clip_norm",
        "privacy.delta",
        "privacy.accountant",
        "federation.clients_per_round",
        "federation.clients_total",
    )

    def accounting_parameters(self, cfg: Config, *, pool_size: int | None = None) -> AccountingParameters:
        """``z`` (effective, with adaptive clipping) at ``q = clients_per_round / clients_total``, per client."""
        f = cfg.federation
        return AccountingParameters(
            effective_config_noise_multiplier(cfg), f.clients_per_round / f.clients_total, "client"
        )

    def server_accountant(self, cfg: Config) -> PrivacyAccountant:
        """One accountant for the run, on the server."""
        return PrivacyAccountant(cfg.privacy.accountant)

    def sample_clients(self, server: ServerPrivacy, round_idx: int) -> list[int]:
        """Poisson sampling with ``q = clients_per_round / clients_total`` from the secret privacy seed.

        A cohort recomputable from the public seed would void the amplification the accountant counts on.
        """
        from fedmeta.rng import derive_seed
        from fedmeta.sampling import sample_clients

        f = server.cfg.federation
        seed = derive_seed(server.secret_seed, "dp-sample")
        return sample_clients(seed, round_idx, f.clients_total, f.clients_per_round, method="poisson")

    def server_stages(self, server: ServerPrivacy) -> list[Stage]:
        """``clip`` -> ``sum`` -> ``noise`` -> ``mean``: ``(sum clip(u_i, C) + N(0, (z_u C)^2)) / clients_per_round``.

        The ``clip`` stage owns ``C``; adaptive clipping moves it. An empty cohort releases pure
        noise (and is accounted).
        """
        from fedmeta.privacy.stages import CentralNoiseStage, ClippedSumStage, ClipStage, FixedDenominatorStage

        return [ClipStage(server), ClippedSumStage(server), CentralNoiseStage(server), FixedDenominatorStage(server)]

    def account(self, server: ServerPrivacy, release: RoundRelease) -> None:
        """One step of the run's accountant at the client sample rate."""
        assert server.accountant is not None
        server.accountant.step(
            noise_multiplier=server.effective_noise_multiplier, sample_rate=server.client_sample_rate
        )

    def round_entry(self, server: ServerPrivacy) -> dict[str, Any]:
        """The client sample rate."""
        return {"sample_rate": server.client_sample_rate}

    def epsilon(self, server: ServerPrivacy) -> float:
        """The run's epsilon."""
        assert server.accountant is not None
        return server.accountant.get_epsilon(server.cfg.privacy.delta)

    def summary_entry(self, server: ServerPrivacy) -> dict[str, Any]:
        """The client sample rate."""
        return {"sample_rate": server.client_sample_rate}
