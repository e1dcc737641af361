"""The server stages privacy mechanisms contribute to the round loop's chain.

A mechanism declares its part of the server chain with
:meth:`~fedmeta.privacy.mechanisms.PrivacyMechanism.server_stages`; :class:`ServerPrivacy` builds
it once per run and :func:`~fedmeta.federation.stages.build_stages` places it where the
aggregation goes (after the reply transforms, before the aggregate transforms)::

    client-central:  clip (reply stage) -> sum (fixed denominator) -> noise -> mean
    client-local:    aggregate (the rule) -> clip (the clip norm, moved by the clients' noisy bits)
    client-distributed: sum (checks on the unmasked secure sum) -> mean (fixed denominator)
    none, task:      aggregate (the rule, over already private updates)

Client-central is DP-FedAvg (McMahan et al., 2018) cut into its parts: each reply is clipped to
``C`` (:class:`ClipStage`, which owns the run's clip norm and, with adaptive clipping, releases the
noisy unclipped fraction and moves ``C``: Andrew et al., 2021), the clipped updates are summed
(:class:`ClippedSumStage`), ``N(0, (z C)^2)`` is added to the sum (:class:`CentralNoiseStage`), and
the sum is divided by the expected cohort size, not the number that replied
(:class:`FixedDenominatorStage`). The float operations and noise draws are exactly those of
:func:`~fedmeta.privacy.clipping.central_private_mean`: the clip factors are applied inside the one
float64 weighted sum, and the noise goes on the sum before the division.

The clip norm is the only state these stages keep; it is saved under the stage's name (``clip``)
in the checkpoint. A checkpoint written before the split holds it in the privacy entry
(``clip_norm``); :meth:`ServerPrivacy.load_state_dict` still reads it there.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from fedmeta.errors import CheckpointError
from fedmeta.privacy.adaptive import clipped_indicator, initial_clip_state, noisy_unclipped_fraction
from fedmeta.privacy.clipping import add_gaussian_noise, clip_factors, weighted_sum
from fedmeta.privacy.mechanisms.base import CLIP_BIT_KEY
from fedmeta.privacy.randomness import privacy_generator

if TYPE_CHECKING:
    from fedmeta.federation.stages import RoundState
    from fedmeta.privacy.facade import ServerPrivacy

__all__ = [
    "ClipNormStage",
    "ClipStage",
    "ClippedSumStage",
    "CentralNoiseStage",
    "FixedDenominatorStage",
    "RuleAggregationStage",
    "LocalClipBitsStage",
    "SecureSumStage",
    "SecureMeanStage",
]

log = logging.getLogger(__name__)


class _PrivacyStage:
    """A stage of a :class:`ServerPrivacy`'s chain: it writes the round's ``privacy`` entries there.

    A stage declares in :attr:`needs` the :class:`~fedmeta.federation.stages.RoundState` fields the
    stages before it must have set; calling it checks them, then :meth:`apply` acts.
    """

    name = "privacy"
    #: the round-state fields (``aggregate``, ``clip_norm``, ...) the stages before this one must set
    needs: ClassVar[tuple[str, ...]] = ()

    def __init__(self, server: ServerPrivacy) -> None:
        self.server = server

    def __call__(self, state: RoundState) -> None:
        """Check :attr:`needs`, then :meth:`apply`.

        Raises:
            ValueError: naming the stage and the fields no stage before it set (a chain in the wrong order).
        """
        missing = [f for f in self.needs if getattr(state, f) is None]
        if missing:
            raise ValueError(f"server stage {self.name!r} needs {', '.join(missing)} from a stage before it")
        self.apply(state)

    def apply(self, state: RoundState) -> None:
        """Act on the round in flight (in place)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Stateless: ``{}``."""
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Nothing to restore."""


class ClipNormStage(_PrivacyStage):
    """A stage that owns the run's clip norm ``C`` (moved by adaptive clipping), saved under its name.

    Args:
        server: the run's privacy state (its round entries, noise constants and secret seed).
    """

    name = "clip"

    def __init__(self, server: ServerPrivacy) -> None:
        super().__init__(server)
        p = server.cfg.privacy
        #: the current clip norm and the constants that move it
        self.clip = initial_clip_state(p, server.count_stddev)

    def move(self, unclipped_fraction: float | None) -> None:
        """Adaptive clipping: move ``C`` by a round's noisy unclipped fraction, and record it.

        Args:
            unclipped_fraction: the round's noisy fraction of updates that were not clipped (``None``:
                nothing arrived to estimate it from; ``C`` stays).
        """
        self.clip = self.clip.updated(unclipped_fraction)
        info = self.server.round_info
        info["unclipped_fraction"] = unclipped_fraction
        info["next_clip_norm"] = self.clip.clip_norm

    def state_dict(self) -> dict[str, Any]:
        """``{"clip_norm": C}``."""
        return {"clip_norm": self.clip.clip_norm}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict`.

        Raises:
            CheckpointError: if the state has no usable ``clip_norm``.
        """
        try:
            norm = float(state["clip_norm"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CheckpointError(f"server stage {self.name!r}: the checkpoint's clip norm is unusable: {exc}") from exc
        self.clip = dataclasses.replace(self.clip, clip_norm=norm)


class ClipStage(ClipNormStage):
    """Client-central, a reply stage: clip every reply to ``C``; adaptive clipping then moves ``C``.

    Each reply's factor ``min(1, C / ||u_i||)`` goes to ``state.clip_factors`` and the bound to
    ``state.clip_norm``; :class:`ClippedSumStage` applies the factors inside its float64 weighted
    sum (so that each update is scaled and added in one pass). With ``privacy.adaptive_clipping``
    the stage releases ``(sum_i (b_i - 1/2) + N(0, sigma_b^2)) / E[n] + 1/2`` from the ``count``
    noise stream and moves ``C`` for the next round. It acts on an empty cohort too.

    Raises:
        ValueError: if a reply is not finite.
    """

    def apply(self, state: RoundState) -> None:
        """Clip the replies at the current ``C``; with adaptive clipping, release the count and move ``C``."""
        server = self.server
        used = self.clip.clip_norm
        server.open_round(len(state.replies))
        factors, norms = clip_factors([rep.update for rep in state.replies], used, reference=state.reference)
        state.clip_norm, state.clip_factors = used, factors
        if server.cfg.privacy.adaptive_clipping:
            self.move(
                noisy_unclipped_fraction(
                    [clipped_indicator(n, used) for n in norms],
                    count_stddev=server.count_stddev,
                    expected_count=server.expected_clients,
                    generator=privacy_generator(server.secret_seed, "count", state.round_idx),
                )
            )


class ClippedSumStage(_PrivacyStage):
    """Client-central, the aggregation rule: the sum of the clipped replies, over a fixed denominator.

    Sets ``state.aggregate`` to ``sum_i f_i u_i`` (the clip factors of :class:`ClipStage`; zeros for
    an empty cohort) and ``state.denominator`` to the expected cohort size ``clients_per_round``;
    :class:`FixedDenominatorStage` divides once the noise is in. Needs a clip stage before it.
    """

    name = "sum"
    needs = ("clip_factors",)

    def apply(self, state: RoundState) -> None:
        """Sum the clipped replies; the denominator waits for the noise."""
        assert state.clip_factors is not None
        updates = [rep.update for rep in state.replies]
        state.aggregate = weighted_sum(updates, state.clip_factors, reference=state.reference)
        state.denominator = self.server.expected_clients


class CentralNoiseStage(_PrivacyStage):
    """Client-central, an aggregate stage: ``N(0, (z_u C)^2)`` on the clipped sum.

    ``z_u`` is the update noise multiplier (raised under adaptive clipping to pay for the count),
    ``C`` the bound the round was clipped to; the noise is drawn from the secret ``noise`` stream of
    the round. Records ``noise_std`` in the round's ``privacy`` entry. Needs a clipped sum.
    """

    name = "noise"
    needs = ("aggregate", "clip_norm")

    def apply(self, state: RoundState) -> None:
        """Add the calibrated noise to the sum."""
        assert state.aggregate is not None and state.clip_norm is not None
        server = self.server
        std = server.update_noise_multiplier * state.clip_norm
        generator = privacy_generator(server.secret_seed, "noise", state.round_idx)
        state.aggregate = add_gaussian_noise(state.aggregate, std, generator)
        server.round_info["noise_std"] = std


class FixedDenominatorStage(_PrivacyStage):
    """Client-central: divide the noisy sum by its fixed denominator (the expected cohort size).

    Dividing by ``E[n]`` rather than the number that replied keeps the released mean's sensitivity
    at ``C / E[n]`` whatever the cohort turned out to be. Needs a sum over a fixed denominator.

    Raises:
        ValueError: if the denominator is not positive.
    """

    name = "mean"
    needs = ("aggregate", "denominator")

    def apply(self, state: RoundState) -> None:
        """Divide the sum by its denominator and clear it."""
        assert state.aggregate is not None and state.denominator is not None
        if not state.denominator > 0:
            raise ValueError(f"expected_count must be positive, got {state.denominator!r}")
        denominator = state.denominator
        state.aggregate = {k: v / denominator for k, v in state.aggregate.items()}
        state.denominator = None


class RuleAggregationStage(_PrivacyStage):
    """Client-local, task (and none): ``federation.aggregation``, unweighted, over already private updates.

    Combining private updates is post-processing. An empty cohort leaves no aggregate (no step).
    """

    name = "aggregate"

    def apply(self, state: RoundState) -> None:
        """Combine the replies with the configured rule (nothing for an empty cohort)."""
        from fedmeta.aggregation import build_aggregator, stack

        if not state.replies:
            log.info("round %d: empty cohort, no update", state.round_idx)
            state.aggregate = None
            return
        self.server.open_round(len(state.replies))
        updates = [rep.update for rep in state.replies]
        weights = torch.ones(len(updates), dtype=torch.float64)
        rule = build_aggregator(self.server.cfg)
        state.aggregate = rule.aggregate(stack(updates), weights, reference=state.reference)


class LocalClipBitsStage(ClipNormStage):
    """Client-local: owns the clip norm sent to the clients; adaptive clipping moves it by their noisy bits.

    The server averages the noisy centred clip bits the replies carry (post-processing) and moves
    ``C`` for the next round. A round without an aggregate (an empty cohort) leaves ``C`` as it is.
    """

    def apply(self, state: RoundState) -> None:
        """Move ``C`` by the replies' noisy bits (adaptive clipping only)."""
        from fedmeta.privacy.adaptive import fraction_from_local_indicators

        if state.aggregate is None or not self.server.cfg.privacy.adaptive_clipping:
            return
        bits = [float(rep.metrics[CLIP_BIT_KEY]) for rep in state.replies if CLIP_BIT_KEY in rep.metrics]
        self.move(fraction_from_local_indicators(bits))


class SecureSumStage(_PrivacyStage):
    """Client-distributed: the unmasked secure sum, checked, over the fixed denominator ``clients_per_round``.

    The round carries no per-client replies, only ``state.secure_sum``
    (:class:`~fedmeta.privacy.secure_sum.SecureSum`). The stage records the survivors, the clipped
    coordinates and the quantization error bounds in the round's ``privacy`` entry, then runs
    :func:`~fedmeta.privacy.secure_sum.check_sum`: a sum that passes becomes ``state.aggregate``
    (a sum: ``state.denominator`` is set for the mean stage); one that fails leaves no aggregate
    (the round moves nothing; it was unmasked, so it is still accounted) and says why in
    ``sum_check``.

    Raises:
        ValueError: if the round carries no secure sum (a transport that filed per-client replies).
    """

    name = "sum"

    def apply(self, state: RoundState) -> None:
        """Check the sum and set the aggregate (or none, when a check fails)."""
        from fedmeta.privacy.secure_sum import check_sum

        total = state.secure_sum
        if total is None:
            raise ValueError(
                f"round {state.round_idx}: privacy.mode '{self.server.mode}' aggregates a secure sum, and the "
                "transport delivered none"
            )
        server = self.server
        server.open_round(len(total.survivors))
        threshold = server.mechanism.min_survivors(server.cfg)
        assert threshold is not None
        summed, info = check_sum(total, state.reference, min_survivors=threshold)
        server.round_info.update(info)
        if summed is None:
            log.warning("round %d: the secure sum fails the server's checks (%s); no update", state.round_idx,
                        info.get("sum_check"))
            state.aggregate = None
            return
        state.aggregate, state.denominator = summed, server.expected_clients


class SecureMeanStage(_PrivacyStage):
    """Client-distributed: divide a checked secure sum by ``clients_per_round`` (nothing when it failed)."""

    name = "mean"

    def apply(self, state: RoundState) -> None:
        """Divide, unless the sum stage left no aggregate."""
        if state.aggregate is None:
            return
        FixedDenominatorStage(self.server).apply(state)
