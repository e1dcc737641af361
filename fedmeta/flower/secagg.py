"""Secure aggregation over Flower for ``privacy.mode: client-distributed``: SecAgg+ driven from our loop.

Flower 1.42 has SecAgg+ only in its legacy API: :class:`flwr.server.workflow.SecAggPlusWorkflow`
drives a legacy ``Strategy`` through a :class:`flwr.server.LegacyContext`, and
``flwr.client.mod.secaggplus_mod`` answers its four stages on the client, calling the train
handler in the third one and reading its reply as a legacy ``FitRes``. This module adapts both
ends to fedmeta:

* server: :func:`secure_train` runs one round's protocol for :class:`~fedmeta.flower.transport.FlowerTransport`.
  A small legacy strategy (:class:`CohortStrategy`) hands the workflow the round's cohort (one
  Flower node per logical client) and instructions in ``configure_fit`` and receives the unmasked
  sum in ``aggregate_fit``; fedmeta counts the survivors itself (the workflow's
  ``reconstruction_threshold`` is checked per neighbourhood, and a halted protocol only logs), and
  files one :class:`~fedmeta.privacy.secure_sum.SecureSum` with the loop, or none when the protocol
  halted. Every node is every other's neighbour (``num_shares = 1.0``, the whole cohort), so the
  per-neighbourhood threshold ``t`` is the global one: Flower unmasks only when at least ``t``
  masked updates were collected. The fixed point (``clipping_range``, ``quantization_range``,
  ``modulus_range``) is :meth:`~fedmeta.privacy.mechanisms.PrivacyMechanism.fixed_point`'s; every
  weight is 1 (``max_weight = 1``, ``num_examples = 1``), never a client-declared count.
* client: :func:`secure_sum_mod` checks the protocol's set-up against the client's own config
  (threshold and ranges: a server cannot lower ``t`` or shrink the range behind a site's back),
  then hands over to ``secaggplus_mod``; :func:`secure_train_reply` is the train handler's answer:
  the noisy, range-clipped update and its control coordinates in the legacy ``FitRes`` layout,
  with no metrics.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, cast

import flwr.compat.common.recorddict_compat as compat
import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.client.mod import secaggplus_mod
from flwr.common import Code, FitIns, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_proxy import ClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow

from fedmeta.experiment import Experiment
from fedmeta.flower import records as fl
from fedmeta.privacy.mechanisms import mechanism_for
from fedmeta.privacy.secure_sum import FixedPoint, SecureSum, encode_update
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.federation.loop import RoundLog, RoundLoop
    from fedmeta.flower.transport import FlowerTransport

__all__ = [
    "KEYS_KEY",
    "CohortStrategy",
    "DropoutTolerantSecAggPlus",
    "secure_train",
    "secure_sum_mod",
    "secure_train_reply",
]

log = logging.getLogger(__name__)

#: FitIns config key with the meta-parameters' names, in the order of the arrays.
KEYS_KEY = "fedmeta.keys"


class _NodeProxy(ClientProxy):
    """A legacy client proxy that is only a node id (the workflow sends its messages itself)."""

    def __init__(self, node_id: int) -> None:
        super().__init__(str(node_id))
        self.node_id = int(node_id)

    def _direct_call(self, what: str) -> Any:
        # SecAggPlusWorkflow exchanges its messages through the grid itself and reads only the
        # proxy's node id; a direct legacy call would bypass the protocol, so it is refused loudly
        raise NotImplementedError(
            f"node {self.node_id}: {what} is not a SecAgg+ step; the workflow talks to nodes through the grid"
        )

    def get_properties(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        return self._direct_call("get_properties")

    def get_parameters(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        return self._direct_call("get_parameters")

    def fit(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        return self._direct_call("fit")

    def evaluate(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        return self._direct_call("evaluate")

    def reconnect(self, ins: Any, timeout: float | None, group_id: int | None) -> Any:
        return self._direct_call("reconnect")


class CohortStrategy(Strategy):
    """The legacy strategy SecAgg+ drives for one round: our cohort in, the unmasked sum out.

    Args:
        fit_ins: the round's ``(proxy, FitIns)`` pairs, one per located client.

    Attributes:
        results: what ``aggregate_fit`` received (``None`` until the protocol completes): one legacy
            ``FitRes`` per survivor, each carrying the same unmasked aggregate.
    """

    def __init__(self, fit_ins: list[tuple[ClientProxy, FitIns]]) -> None:
        self.fit_ins = fit_ins
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def initialize_parameters(self, client_manager: Any) -> Parameters | None:
        return None

    def configure_fit(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return list(self.fit_ins)

    def aggregate_fit(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict[str, Any]]:
        self.results = list(results)
        return None, {}  # the loop, not Flower, moves the parameters

    def configure_evaluate(self, server_round: int, parameters: Parameters, client_manager: Any) -> list[Any]:
        return []

    def aggregate_evaluate(self, server_round: int, results: list[Any], failures: list[Any]) -> tuple[None, dict]:
        return None, {}

    def evaluate(self, server_round: int, parameters: Parameters) -> None:
        return None


class DropoutTolerantSecAggPlus(SecAggPlusWorkflow):
    """Flower's SecAgg+ workflow, forgetting nodes that left before they distributed their secret shares.

    In Flower 1.42 a node that does not answer the set-up or the key-sharing stage stays among the
    workflow's sampled nodes: the unmask stage then asks the others for shares of it that none
    holds (the clients' ``secaggplus_mod`` raises on the request, or the server finds too few
    shares) and the protocol halts, so a single early dropout spoils the round. Such a node never
    took part: no other node masks its update with it (a client masks only with the nodes whose
    encrypted shares it received), so after each of those two stages the sampled nodes become the
    nodes still active and every neighbourhood forgets the others. Dropouts after the key sharing
    are Flower's own case (their masks are removed with the shares the others hold).
    """

    def setup_stage(self, grid: Any, context: LegacyContext, state: Any) -> bool:
        """Flower's set-up stage, then forget the nodes that did not answer it."""
        return super().setup_stage(grid, context, state) and self._forget_absent(state)

    def share_keys_stage(self, grid: Any, context: LegacyContext, state: Any) -> bool:
        """Flower's key-sharing stage, then forget the nodes that did not answer it."""
        return super().share_keys_stage(grid, context, state) and self._forget_absent(state)

    def _forget_absent(self, state: Any) -> bool:
        active = set(state.active_node_ids)
        state.sampled_node_ids = set(active)
        state.nid_to_neighbours = {nid: set(nbrs) & active for nid, nbrs in state.nid_to_neighbours.items()
                                   if nid in active}  # fmt: skip
        return bool(self._check_threshold(state))


class _ExchangeGrid:
    """The grid as the workflow sees it: fedmeta's short-poll ``send_and_receive``, counting received bytes."""

    def __init__(self, transport: FlowerTransport, round_idx: int) -> None:
        self.transport = transport
        self.round_idx = round_idx
        self.nbytes = 0

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        from fedmeta.flower.transport import send_and_receive

        t = self.transport
        replies = send_and_receive(
            t.grid, list(messages), kind=fl.TRAIN, round_idx=self.round_idx,
            timeout=math.inf if timeout is None else timeout, deadline=t.deadline, poll_interval=t.poll_interval,
            client_of=t.directory.client_of if t.directory else None,
        )  # fmt: skip
        self.nbytes += sum(fl.record_nbytes(r.content) for r in replies if not r.has_error())
        return replies


def secure_train(transport: FlowerTransport, loop: RoundLoop, book: RoundLog) -> None:
    """One round of SecAgg+ over ``transport``'s grid; files the unmasked sum (or nothing) with ``loop``.

    Clients without a node are listed in ``book.unavailable``; those that drop out during the
    protocol are failed in ``book``. When fewer than ``t`` clients can be asked, or the protocol
    halts, no sum is filed and the loop refuses the round.
    """
    cfg, r = loop.cfg, book.round_idx
    mechanism = mechanism_for(cfg)
    fixed_point = mechanism.fixed_point(cfg, loop.meta)
    threshold = mechanism.min_survivors(cfg)
    assert fixed_point is not None and threshold is not None
    directory = transport._require_directory()
    located, missing = directory.locate(book.sampled)
    book.unavailable = missing
    if len(located) < threshold:
        log.warning("round %d: only %d sampled clients have a node, fewer than t=%d", r, len(located), threshold)
        return
    keys = list(loop.meta)
    params = ndarrays_to_parameters([loop.meta[k].detach().cpu().numpy() for k in keys])
    fit_ins: list[tuple[ClientProxy, FitIns]] = []
    for cid, node in sorted(located.items()):
        config = {**loop.instructions(r, cid), KEYS_KEY: ",".join(keys)}
        fit_ins.append((_NodeProxy(node), FitIns(params, config)))
    strategy = CohortStrategy(fit_ins)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={})
    context.state.config_records["config"] = ConfigRecord({"current_round": r})
    context.state.array_records["parameters"] = compat.parameters_to_arrayrecord(params, True)
    legacy = LegacyContext(context, config=ServerConfig(num_rounds=cfg.federation.rounds), strategy=strategy)
    workflow = DropoutTolerantSecAggPlus(
        num_shares=1.0, reconstruction_threshold=threshold, max_weight=1.0,
        clipping_range=fixed_point.clipping_range, quantization_range=fixed_point.quantization_range,
        modulus_range=fixed_point.modulus, timeout=cfg.federation.round_timeout,
    )  # fmt: skip
    grid = _ExchangeGrid(transport, r)
    book.bytes_down = fl.record_nbytes(compat.fitins_to_recorddict(fit_ins[0][1], True))
    started = time.perf_counter()
    workflow(cast(Any, grid), legacy)
    book.add_time("secure_aggregation", time.perf_counter() - started)
    results = strategy.results
    if results is None:
        for cid in located:
            loop.fail(book, cid, "the secure aggregation halted before unmasking")
        log.warning("round %d: the secure aggregation halted; nothing was unmasked", r)
        return
    survivors = [directory.client_of(proxy.node_id) for proxy, _ in results]
    known = tuple(sorted(c for c in survivors if c is not None))
    for cid in set(located) - set(known):
        loop.fail(book, cid, "its masked update did not reach the secure sum")
    n = len(results)
    mean = parameters_to_ndarrays(results[0][1].parameters)
    # Flower divides the unmasked sum by the survivors' total weight, n (each weight is 1)
    total = tuple(arr.astype("float64") * n for arr in mean)
    loop.accept_sum(book, SecureSum(total, known, fixed_point, nbytes=grid.nbytes))


def _expected_setup(fixed_point: FixedPoint, threshold: int) -> dict[str, float]:
    return {
        Key.THRESHOLD: threshold,
        Key.CLIPPING_RANGE: fixed_point.clipping_range,
        Key.TARGET_RANGE: fixed_point.quantization_range,
        Key.MOD_RANGE: fixed_point.modulus,
        Key.MAX_WEIGHT: 1.0,
    }


def secure_sum_mod(
    exp: Experiment, message: Message, context: Context, call_next: Callable[[Message, Context], Message]
) -> Message:
    """``secaggplus_mod`` behind a check of the protocol's set-up against this client's own config.

    Raises:
        ValueError: if the server's set-up asks for another threshold, range or weight than the
            client's config implies (the mod's error reply then tells the server).
    """
    configs = message.content.config_records.get(RECORD_KEY_CONFIGS)
    if configs is not None and configs.get(Key.STAGE) == Stage.SETUP:
        mechanism = mechanism_for(exp.cfg)
        fixed_point = mechanism.fixed_point(exp.cfg, exp.initial_meta_params())
        threshold = mechanism.min_survivors(exp.cfg)
        assert fixed_point is not None and threshold is not None
        for key, want in _expected_setup(fixed_point, threshold).items():
            got = configs.get(key)
            if not isinstance(got, int | float) or not math.isclose(float(got), float(want), rel_tol=1e-12):
                raise ValueError(
                    f"the server's SecAgg+ set-up has {key}={got!r}; this site's config (privacy.mode "
                    f"'{mechanism.name}', privacy.min_survivors, privacy.clip_norm, privacy.noise_multiplier) "
                    f"implies {want!r}: refused"
                )
    return secaggplus_mod(message, context, call_next)


def secure_train_reply(exp: Experiment, message: Message, client_id: int | None) -> Message:
    """The train handler's answer inside SecAgg+: the encoded noisy update as a legacy ``FitRes``.

    The update is clipped to ``C`` and noised with this client's share (the mechanism's client
    side), every coordinate clipped to ``[-R, R]`` and the control coordinates appended
    (:func:`~fedmeta.privacy.secure_sum.encode_update`); ``num_examples`` is 1 and there are no
    metrics: ``secaggplus_mod`` masks the arrays and nothing else of the client leaves it.

    Raises:
        UpdateRejected: if the received parameters do not fit this client's model.
    """
    from fedmeta.federation import check_received_meta, resolve_client_id
    from fedmeta.privacy.client_update import private_client_update
    from fedmeta.privacy.facade import ClientPrivacy

    fitins = compat.recorddict_to_fitins(message.content, keep_input=True)
    config = dict(fitins.config)
    keys = str(config[KEYS_KEY]).split(",")
    arrays = parameters_to_ndarrays(fitins.parameters)
    reference = exp.initial_meta_params()
    meta: Params = {}
    for key, arr in zip(keys, arrays, strict=True):
        meta[key] = torch.from_numpy(arr.copy()).to(reference[key].dtype if key in reference else torch.float32)
    check_received_meta(exp, meta)
    cid = resolve_client_id(client_id, int(config["client-id"]) if "client-id" in config else None)
    round_idx = int(cast(int, config["round"]))
    privacy = ClientPrivacy(exp.cfg, cid)
    update, _ = private_client_update(exp, meta, round_idx, cid, privacy)
    mechanism = mechanism_for(exp.cfg)
    fixed_point = mechanism.fixed_point(exp.cfg, reference)
    assert fixed_point is not None
    encoded, clipped = encode_update({k: update.gradient[k] for k in keys}, fixed_point)
    if clipped:
        log.warning("client %d: %d coordinates of its noisy update were clipped to the fixed-point range", cid, clipped)
    fitres = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(encoded), 1, {})
    return Message(compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=message)
