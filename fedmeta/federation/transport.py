"""How a round's instructions reach the clients and their replies come back to the :class:`RoundLoop`.

A :class:`Transport` does only that: it never aggregates, steps the optimizer, accounts, evaluates
on the server or writes outputs (the loop does, once for every path). It files what comes back
into the round's :class:`~fedmeta.federation.loop.RoundLog` through :meth:`RoundLoop.accept` and
:meth:`RoundLoop.fail`, so that every reply is validated the same way.

Two shapes of exchange fit this interface on purpose:

* **several logical clients per message**: :class:`InProcessTransport` computes a whole cohort in
  one vectorized pass and files one reply per client; a Flower message may likewise carry many
  logical clients of one node;
* **a round of several exchanges**: :meth:`Transport.train` may talk to the clients as often as a
  protocol needs (retries today; secure aggregation's key exchange, share and unmask stages).

The Flower transport lives in :mod:`fedmeta.flower` (this package has no Flower import).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fedmeta.algorithms import MetaUpdate
from fedmeta.errors import BudgetExhausted, CheckpointError
from fedmeta.federation.client import evaluate_on_client, train_cohort
from fedmeta.rng import derive_seed

if TYPE_CHECKING:
    from fedmeta.federation.loop import RoundLog, RoundLoop

__all__ = ["Transport", "InProcessTransport", "CLIENT_PRIVACY_STATE"]

log = logging.getLogger(__name__)

#: Checkpoint ``extra`` entry with the in-process clients' privacy accountants.
CLIENT_PRIVACY_STATE = "client_privacy"


class Transport(Protocol):
    """The exchange between a :class:`~fedmeta.federation.loop.RoundLoop` and its clients."""

    def start(self, loop: RoundLoop) -> None:
        """Find the clients before the first round (e.g. wait for nodes and ask who they are).

        Raises:
            InconsistentReplies: if too few clients are available to run a round.
        """
        ...

    def train(self, loop: RoundLoop, book: RoundLog) -> None:
        """Send ``loop.instructions`` and ``loop.meta`` to ``book.sampled``; file every reply.

        Replies go through ``loop.accept(book, reply)``; clients that raised, timed out or sent
        nothing through ``loop.fail(book, client_id, reason)``; clients with no route are listed
        in ``book.unavailable``.
        """
        ...

    def evaluate(
        self, loop: RoundLoop, round_idx: int, cohort: Sequence[int], *, tasks_per_client: int
    ) -> tuple[list[tuple[Mapping[str, float], int]], int]:
        """Federated evaluation on the clients' own held-out tasks.

        Returns:
            Each answering client's aggregate metrics and task count, and how many failed.
        """
        ...

    def state_dict(self) -> dict[str, Any]:
        """State kept in the checkpoint's ``extra`` (``{}``: none)."""
        ...

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore :meth:`state_dict` on resume."""
        ...

    def summary_extra(self) -> dict[str, Any]:
        """Entries for ``summary.json``'s ``federation`` section."""
        ...


class InProcessTransport:
    """Every client in this process: the centralized reference.

    Without differential privacy, or under ``client-central`` and ``client-local``, the whole
    cohort's updates come from one vectorized pass (:meth:`Experiment.round_updates`), each
    client's slice equal to what that client computes alone; each client-level DP client then
    privatizes its own slice with its :class:`~fedmeta.privacy.facade.ClientPrivacy` (the
    mechanism's :meth:`~fedmeta.privacy.mechanisms.PrivacyMechanism.privatize_client_update`).
    A mechanism without a batched cohort (``task``) has every site run its DP-SGD steps over its
    pool (:func:`~fedmeta.privacy.client_update.private_round`).
    The clients' accountants live here and in the checkpoint, as a site's live in its node state;
    a client whose own budget is spent sends nothing, as a Flower client answers with an error.
    """

    def __init__(self, *, drop_out: Callable[[int, int], bool] | None = None) -> None:
        self.client_states: dict[int, dict[str, Any]] = {}
        self.rdp_cache: dict[tuple[float, float], Any] = {}  # the clients' accountants share Opacus' RDP curves
        #: ``(round, client) -> True`` for a client that drops out after computing (secure sums only:
        #: its masked update never reaches the sum, as a SecAgg+ client that stops answering)
        self.drop_out = drop_out

    def start(self, loop: RoundLoop) -> None:
        """Nothing to discover: every client id is here; refuse to restart clients' accountants on resume.

        Raises:
            CheckpointError: if the run resumes a checkpoint whose clients kept their own privacy
                accountants elsewhere (one written by ``fedmeta simulate`` or a deployment, whose
                sites keep them in their node state): the in-process clients would start theirs at
                zero and spend the budget again.
        """
        from fedmeta.privacy.mechanisms import mechanism_for

        mechanism = mechanism_for(loop.cfg)
        if loop.round > 0 and mechanism.client_keeps_state and not self.client_states:
            raise CheckpointError(
                f"the checkpoint at round {loop.round} was written by a run in mode "
                f"'{loop.resumed_from or 'unknown'}' whose clients keep their own privacy accountants "
                f"(privacy.mode '{mechanism.name}'); it holds none for in-process clients, so resuming it here "
                f"would restart every client's accountant at zero: resume it the way it was run "
                f"(fedmeta simulate --resume, or the deployment)"
            )

    def train(self, loop: RoundLoop, book: RoundLog) -> None:
        """Compute the cohort's replies and file them."""
        from fedmeta.federation.loop import ClientReply
        from fedmeta.privacy.mechanisms import mechanism_for

        t0 = time.perf_counter()
        cfg, r, clients = loop.cfg, book.round_idx, book.sampled
        mechanism = mechanism_for(cfg)
        if not mechanism.batched_cohort:  # each site runs its own private steps (task-level DP)
            from fedmeta.privacy.client_update import private_round

            for cid in clients:
                try:
                    update, extra, state = private_round(
                        loop.exp, loop.meta, r, cid, state=self.client_states.get(cid), rdp_cache=self.rdp_cache
                    )
                except BudgetExhausted as exc:
                    loop.fail(book, cid, f"BudgetExhausted: {exc}")
                    continue
                self.client_states[cid] = state
                loop.accept(book, ClientReply(cid, update.gradient, update.num_tasks, {**update.metrics, **extra}))
        elif mechanism.secure_sum:
            if clients:
                self._train_secure(loop, book)
        else:
            for cid, update in zip(clients, train_cohort(loop.exp, loop.meta, r, clients), strict=True):
                if mechanism.enabled:
                    try:
                        update, extra = self._privatize(loop, cid, update, r)
                    except BudgetExhausted as exc:
                        loop.fail(book, cid, f"BudgetExhausted: {exc}")
                        continue
                else:
                    extra = {}
                loop.accept(book, ClientReply(cid, update.gradient, update.num_tasks, {**update.metrics, **extra}))
        book.add_time("clients", time.perf_counter() - t0)

    def _train_secure(self, loop: RoundLoop, book: RoundLog) -> None:
        """The cohort's noisy updates summed in SecAgg+'s fixed point; the loop receives only the sum.

        Each client privatizes its own slice (clip, noise share), encodes and quantizes it as a Flower
        client's ``secaggplus_mod`` would (its stochastic rounding from the client's own stream); the
        integers are summed modulo ``M`` and decoded, so this reference and a Flower run agree within
        the quantization error. Clients that :attr:`drop_out` are left out; with fewer than ``t`` left
        the protocol would halt, so no sum is filed.
        """
        from fedmeta.privacy.mechanisms import mechanism_for
        from fedmeta.privacy.randomness import secret_seed
        from fedmeta.privacy.secure_sum import SecureSum, encode_update, quantize, sum_quantized

        cfg, r = loop.cfg, book.round_idx
        mechanism = mechanism_for(cfg)
        fixed_point = mechanism.fixed_point(cfg, loop.meta)
        assert fixed_point is not None
        raw = loop.exp.round_updates(loop.meta, r, book.sampled)
        survivors, quantized = [], []
        for i, cid in enumerate(book.sampled):
            update = MetaUpdate({k: v[i] for k, v in raw.updates.items()}, 1, {})
            sent, _ = self._privatize(loop, cid, update, r)
            arrays, _ = encode_update(sent.gradient, fixed_point)
            if self.drop_out is not None and self.drop_out(r, cid):
                loop.fail(book, cid, "dropped out before its masked update was collected")
                continue
            seed = derive_seed(secret_seed(cfg.privacy.noise_seed), "quantize", r, cid)
            quantized.append(quantize(arrays, fixed_point, np.random.default_rng(seed)))
            survivors.append(cid)
        threshold = mechanism.min_survivors(cfg)
        assert threshold is not None
        if len(survivors) < threshold:
            log.warning("round %d: %d of %d clients survived, fewer than t=%d: the sum stays masked",
                        r, len(survivors), len(book.sampled), threshold)  # fmt: skip
            return
        loop.accept_sum(book, SecureSum(sum_quantized(quantized, fixed_point), tuple(survivors), fixed_point))

    def _privatize(
        self, loop: RoundLoop, cid: int, update: MetaUpdate, round_idx: int
    ) -> tuple[MetaUpdate, dict[str, float]]:
        """A client-level DP client's privatized update (its accountant kept under client-local)."""
        from fedmeta.privacy.facade import CLIP_NORM_KEY, ClientPrivacy

        cfg = loop.cfg
        clip_norm = loop.instructions(round_idx, cid).get(CLIP_NORM_KEY)
        client = ClientPrivacy(cfg, cid, state=self.client_states.get(cid), rdp_cache=self.rdp_cache)
        mechanism = client.mechanism
        sent, extra = mechanism.privatize_client_update(cfg, client, update, round_idx=round_idx, clip_norm=clip_norm)
        if mechanism.client_keeps_state:  # only a client that adds its own noise keeps an accountant
            self.client_states[cid] = client.state_dict()
        return sent, extra

    def evaluate(
        self, loop: RoundLoop, round_idx: int, cohort: Sequence[int], *, tasks_per_client: int
    ) -> tuple[list[tuple[Mapping[str, float], int]], int]:
        """Each client of ``cohort`` evaluates on its own held-out tasks, as a Flower client does."""
        return [evaluate_on_client(loop.exp, loop.meta, cid, num_tasks=tasks_per_client) for cid in cohort], 0

    def state_dict(self) -> dict[str, Any]:
        """The clients' accountants (``{}`` without client-side DP state)."""
        if not self.client_states:
            return {}
        order = sorted(self.client_states)
        return {CLIENT_PRIVACY_STATE: {"clients": order, "states": [self.client_states[c] for c in order]}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the clients' accountants."""
        saved = state.get(CLIENT_PRIVACY_STATE) or {"clients": [], "states": []}
        self.client_states = {int(c): dict(s) for c, s in zip(saved["clients"], saved["states"], strict=True)}

    def summary_extra(self) -> dict[str, Any]:
        """Nothing beyond the loop's counters."""
        return {}

