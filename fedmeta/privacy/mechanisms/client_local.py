"""``privacy.mode: client-local``: every client clips and noises its own update (local DP).

The server is not trusted: it sees only privatized updates. Each client keeps its own accountant
(and refuses to exceed its budget); the server mirrors them to report the largest epsilon. Local
DP compares *any* two inputs of a client, so the sensitivity is ``2 C`` and the accountant is told
``z / 2``; the server knows who took part, so there is no amplification by sampling (``q = 1``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

from fedmeta.privacy.accountant import PrivacyAccountant
from fedmeta.privacy.adaptive import local_noisy_indicator
from fedmeta.privacy.clipping import privatize_update
from fedmeta.privacy.mechanisms.base import (
    CLIP_BIT_KEY,
    MECHANISMS,
    ClientSetup,
    PrivacyMechanism,
    RoundRelease,
)
from fedmeta.privacy.modes import (
    LOCAL_SENSITIVITY_FACTOR,
    AccountingParameters,
    ModeDescription,
    effective_config_noise_multiplier,
    update_noise,
)
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.config import Config
    from fedmeta.federation.stages import Stage
    from fedmeta.privacy.facade import ClientPrivacy, ServerPrivacy

__all__ = ["ClientLocalPrivacy"]


@MECHANISMS.register("client-local")
class ClientLocalPrivacy(PrivacyMechanism):
    """Client-level DP against the server: each client adds the full noise to its own clipped update.

    What leaves a site: its clipped and noised mean meta-update, a nominal task count, its own epsilon
    and steps, and with adaptive clipping a noisy clip bit.
    """

    name = "client-local"
    unit = "client"
    noise_added_by = "client"
    leaves_site = (
        "its clipped and noised mean meta-update, a nominal task count, its own epsilon and steps, "
        "and with adaptive clipping a noisy clip bit"
    )
    description = ModeDescription(
        name="client-local",
        protects="a whole client, against the server and anyone who sees its messages",
        noise_added_by="each client, on its own clipped update, with the full noise",
        server_sees="only privatized updates (and, with adaptive clipping, noisy clip bits)",
        sample_rate="1: the server knows who took part, so sampling gives no amplification; "
        "each client is accounted for the rounds it took part in",
        dropouts="no effect on anyone's guarantee; a client that drops out simply spends nothing",
        accountant="one per client: kept by the client itself (which refuses to exceed its "
        "budget) and mirrored by the server, which reports the largest epsilon of any client",
    )
    supports_adaptive_clipping = True
    client_keeps_state = True
    public = (
        "privacy.noise_multiplier",
        "privacy.clip_norm (and the server's current clip norm)",
        "privacy.delta",
        "privacy.accountant",
        "which rounds a client took part in",
    )
    budget_holder = "a client that takes part in every round"
    default_count_stddev_means = "noise_multiplier"

    def default_count_stddev(self, noise_multiplier: float, clients_per_round: int) -> float:
        """``noise_multiplier``: each client noises its own clip bit."""
        return noise_multiplier

    # -- budget planning -------------------------------------------------------------------------

    def accounting_parameters(self, cfg: Config, *, pool_size: int | None = None) -> AccountingParameters:
        """``z / 2`` (sensitivity ``2 C``) at ``q = 1``, per client."""
        return AccountingParameters(effective_config_noise_multiplier(cfg) / LOCAL_SENSITIVITY_FACTOR, 1.0, "client")

    def noise_multiplier_for(self, accounted: float) -> float:
        """``2 z``: the accountant's ``z`` is half the configured one."""
        return accounted * LOCAL_SENSITIVITY_FACTOR

    # -- client side -----------------------------------------------------------------------------

    def init_client(self, client: ClientPrivacy, setup: ClientSetup) -> None:
        """The client's own accountant, restored from ``setup.state``."""
        client.update_noise_multiplier, client.count_stddev = update_noise(client.cfg)
        client.accountant = PrivacyAccountant(client.cfg.privacy.accountant, rdp_cache=setup.rdp_cache)
        if setup.state:
            client.accountant.load_state_dict(dict(setup.state))

    def privatize_update(
        self, client: ClientPrivacy, update: Params, *, round_idx: int, clip_norm: float | None
    ) -> tuple[Params, dict[str, float]]:
        """``clip(u, C) + N(0, (z_u C)^2)`` (plus the noisy clip bit under adaptive clipping).

        Steps the client's accountant. Taking ``C`` from the server is safe: the noise scales with it.

        Raises:
            BudgetExhausted: if this client's own budget would be exceeded (it must not send).
            ValueError: if the server's clip norm is not a positive number.
        """
        assert client.accountant is not None
        p = client.cfg.privacy
        client.check_local_budget()
        c = float(clip_norm) if clip_norm is not None else p.clip_norm
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"clip norm from the server must be a positive number, got {clip_norm!r}")
        noisy, norm = privatize_update(
            update,
            clip_norm=c,
            noise_std=client.update_noise_multiplier * c,
            generator=client.generator("noise", round_idx),
        )
        extra: dict[str, float] = {}
        if p.adaptive_clipping:
            extra[CLIP_BIT_KEY] = local_noisy_indicator(
                norm, c, count_stddev=client.count_stddev, generator=client.generator("count", round_idx)
            )
        client.accountant.step(noise_multiplier=client.local_noise_multiplier, sample_rate=1.0)
        extra.update(client.report())
        return noisy, extra

    # -- server side -----------------------------------------------------------------------------

    def server_stages(self, server: ServerPrivacy) -> list[Stage]:
        """``aggregate`` (the configured rule over private updates) -> ``clip`` (owns the clip norm sent out).

        With adaptive clipping the ``clip`` stage moves the norm by the average of the clients' noisy bits.
        """
        from fedmeta.privacy.stages import LocalClipBitsStage, RuleAggregationStage

        return [RuleAggregationStage(server), LocalClipBitsStage(server)]

    def account(self, server: ServerPrivacy, release: RoundRelease) -> None:
        """Mirror every sampled client's accountant (``z / 2`` at ``q = 1``)."""
        z_eff = server.effective_noise_multiplier
        for cid in release.sampled:
            acc = server.client_accountants.get(int(cid))
            if acc is None:
                acc = server.client_accountants[int(cid)] = PrivacyAccountant(
                    server.cfg.privacy.accountant, rdp_cache=server.rdp_cache
                )
            acc.step(noise_multiplier=z_eff / LOCAL_SENSITIVITY_FACTOR, sample_rate=1.0)

    def epsilon(self, server: ServerPrivacy) -> float:
        """The largest epsilon of any client (identical histories are evaluated once)."""
        delta = server.cfg.privacy.delta
        best = 0.0
        seen: dict[tuple[tuple[float, float, int], ...], float] = {}
        for acc in server.client_accountants.values():
            key = tuple(acc.history)
            if key not in seen:
                seen[key] = acc.get_epsilon(delta)
            best = max(best, seen[key])
        return best

    def summary_entry(self, server: ServerPrivacy) -> dict[str, Any]:
        """``q = 1`` and how many clients were accounted."""
        return {"sample_rate": 1.0, "clients_accounted": len(server.client_accountants)}
