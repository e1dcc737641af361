"""A site's own privacy floor, pinned in its node config, against which it checks every run (SPEC §4).

Under ``flwr run`` and in a deployment the run config, privacy settings included, comes from
whoever submits the run. A site that does not trust that party pins the least it accepts in its
SuperNode's node config (``--node-config``), and refuses, before computing anything, any run that
asks for less:

=================================  ==============================================================
node config key                    the run must have
=================================  ==============================================================
``privacy-mode``                   ``privacy.mode`` equal to it (a DP mode)
``privacy-min-noise-multiplier``   DP, and ``privacy.noise_multiplier`` at least this
``privacy-max-epsilon``            DP, and ``privacy.target_epsilon`` set and at most this
``privacy-max-delta``              DP, and ``privacy.delta`` at most this
``privacy-max-clip-norm``          DP, and ``privacy.clip_norm`` at most this
=================================  ==============================================================

Under ``client-local`` and ``task`` the site adds the noise and enforces its own budget itself,
so the floor binds what it releases. Under ``client-central`` the server adds the noise: the floor
then checks what the run declares it will do (the site trusts the server to do it, as that mode
assumes). No Flower import: :mod:`fedmeta.flower.client_app` passes ``context.node_config`` in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from fedmeta.config import Config
from fedmeta.errors import ConfigError, PrivacyFloorViolated

__all__ = ["SiteFloor", "FLOOR_KEYS"]

#: The node config keys of a site's privacy floor.
FLOOR_KEYS = (
    "privacy-mode",
    "privacy-min-noise-multiplier",
    "privacy-max-epsilon",
    "privacy-max-delta",
    "privacy-max-clip-norm",
)


def _number(node_config: Mapping[str, Any], key: str) -> float | None:
    raw = node_config.get(key)
    if raw is None or raw == "":
        return None
    try:
        value = float(raw)
    except (TypeError, ValueError):
        raise ConfigError(f"node config '{key}' must be a number, got {raw!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"node config '{key}' must be a positive number, got {raw!r}")
    return value


@dataclass(frozen=True)
class SiteFloor:
    """The least privacy a site accepts (``None``: that part of the floor is not pinned).

    Attributes:
        mode: the ``privacy.mode`` the run must use.
        min_noise_multiplier: the smallest ``privacy.noise_multiplier`` accepted.
        max_epsilon: the largest ``privacy.target_epsilon`` accepted (the run must set one).
        max_delta: the largest ``privacy.delta`` accepted.
        max_clip_norm: the largest ``privacy.clip_norm`` accepted.
    """

    mode: str | None = None
    min_noise_multiplier: float | None = None
    max_epsilon: float | None = None
    max_delta: float | None = None
    max_clip_norm: float | None = None

    @classmethod
    def from_node_config(cls, node_config: Mapping[str, Any]) -> SiteFloor:
        """The floor a node config pins (see :data:`FLOOR_KEYS`); an empty floor when it pins none.

        Raises:
            ConfigError: naming the node config key with a bad value (an unknown mode, ``none``,
                a non-positive or non-numeric bound).
        """
        from fedmeta.privacy.mechanisms import MECHANISMS

        raw_mode = node_config.get("privacy-mode")
        mode = None if raw_mode in (None, "") else str(raw_mode)
        if mode is not None:
            if mode not in MECHANISMS:
                raise ConfigError(
                    f"node config 'privacy-mode' must be one of {', '.join(MECHANISMS.names())}, got {mode!r}"
                )
            if not MECHANISMS.get(mode)().enabled:
                raise ConfigError(f"node config 'privacy-mode' must be a differential-privacy mode, got {mode!r}")
        return cls(
            mode=mode,
            min_noise_multiplier=_number(node_config, "privacy-min-noise-multiplier"),
            max_epsilon=_number(node_config, "privacy-max-epsilon"),
            max_delta=_number(node_config, "privacy-max-delta"),
            max_clip_norm=_number(node_config, "privacy-max-clip-norm"),
        )

    @property
    def pinned(self) -> bool:
        """Whether the node config pins anything."""
        return any(v is not None for v in (self.mode, self.min_noise_multiplier, self.max_epsilon,
                                            self.max_delta, self.max_clip_norm))  # fmt: skip

    def violations(self, cfg: Config) -> list[str]:
        """What ``cfg`` asks for below this floor, one sentence each (empty: the run is accepted)."""
        from fedmeta.privacy.mechanisms import MECHANISMS, mechanism_for

        if not self.pinned:
            return []
        p = cfg.privacy
        mechanism = mechanism_for(cfg)
        out = []
        if self.mode is not None and type(mechanism) is not MECHANISMS.get(self.mode):
            out.append(f"privacy.mode is '{p.mode}', node config 'privacy-mode' requires '{self.mode}'")
        if not mechanism.enabled:
            if self.mode is None:
                out.append(f"privacy.mode is '{p.mode}' (no differential privacy); this site requires DP")
            return out
        if self.min_noise_multiplier is not None and p.noise_multiplier < self.min_noise_multiplier:
            out.append(
                f"privacy.noise_multiplier={p.noise_multiplier:g} is below node config "
                f"'privacy-min-noise-multiplier'={self.min_noise_multiplier:g}"
            )
        if self.max_epsilon is not None and (p.target_epsilon is None or p.target_epsilon > self.max_epsilon):
            asked = "unset (no budget)" if p.target_epsilon is None else f"{p.target_epsilon:g}"
            out.append(
                f"privacy.target_epsilon is {asked}, node config 'privacy-max-epsilon' allows at most "
                f"{self.max_epsilon:g}"
            )
        if self.max_delta is not None and p.delta > self.max_delta:
            out.append(f"privacy.delta={p.delta:g} exceeds node config 'privacy-max-delta'={self.max_delta:g}")
        if self.max_clip_norm is not None and p.clip_norm > self.max_clip_norm:
            out.append(
                f"privacy.clip_norm={p.clip_norm:g} exceeds node config 'privacy-max-clip-norm'={self.max_clip_norm:g}"
            )
        return out

    def check(self, cfg: Config) -> None:
        """Refuse a run that asks for less than this floor.

        Raises:
            PrivacyFloorViolated: listing every setting below the floor, with the run's value and
                the node config key.
        """
        problems = self.violations(cfg)
        if problems:
            raise PrivacyFloorViolated(
                "this site refuses the run: it asks for less privacy than the site's floor: " + "; ".join(problems)
            )
