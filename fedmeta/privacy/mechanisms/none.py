"""``privacy.mode: none``: no differential privacy."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from fedmeta.privacy.mechanisms.base import MECHANISMS, PrivacyMechanism
from fedmeta.privacy.modes import ModeDescription

if TYPE_CHECKING:
    from fedmeta.algorithms import MetaUpdate
    from fedmeta.config import Config
    from fedmeta.privacy.facade import ClientPrivacy

__all__ = ["NoPrivacy"]


@MECHANISMS.register("none")
class NoPrivacy(PrivacyMechanism):
    """No differential privacy: nothing is clipped, noised or accounted.

    What leaves a site: the raw mean meta-update, its task count and the means of its training metrics.
    """

    name = "none"
    unit = "none"
    noise_added_by = "nobody"
    leaves_site = "the raw mean meta-update, its task count and the means of its training metrics"
    description = ModeDescription(
        name="none",
        protects="nothing (no differential privacy)",
        noise_added_by="nobody",
        server_sees="every client's raw mean meta-update and training metrics",
        sample_rate="not used",
        dropouts="lower the round's weight only",
        accountant="none",
    )
    #: without DP there is no unit to protect: clients may share site folders (task.share_sites)
    accepts_shared_sites = True
    reports_task_count = True
    evaluates_on_site_data = True

    def privatize_client_update(
        self, cfg: Config, client: ClientPrivacy, update: MetaUpdate, *, round_idx: int, clip_norm: float | None = None
    ) -> tuple[MetaUpdate, dict[str, float]]:
        """The update unchanged, with its own metrics and task count; nothing else is sent."""
        return update, {}

    def releasable_metrics(self, metrics: Mapping[str, Any]) -> dict[str, Any]:
        """Everything: without DP a client's training metrics are sent as they are."""
        return dict(metrics)
