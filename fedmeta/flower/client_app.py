"""The fedmeta Flower ``ClientApp``: thin handlers that unpack, call :mod:`fedmeta`, and pack.

* ``query``: the server's start-up question; the node answers with its client id (simulation:
  Flower's ``partition-id``; deployment: ``client-id`` or ``partition-id`` from
  ``--node-config``) and a description of its data (kind, task count, shapes), which lets the
  server map cohorts onto nodes and refuse mismatched sites before training.
* ``train``: receive the meta-parameters (Meta-SGD rates included) and the round; draw this
  client's tasks (generated from ``(seed, round, client)``, or read from the site's
  ``data-dir``), run the configured algorithm, reply with the mean meta-update, the number of
  tasks and mean metrics only.
* ``evaluate``: adapt on this client's held-out tasks and reply with aggregate metrics only.
* ``train.cohort`` / ``evaluate.cohort``: a pooled simulation node (``simulation.pool``,
  :mod:`fedmeta.flower.pool`) plays the logical clients whose ids the message lists, in one
  batched pass, and replies with one update (or metrics) per client.

Under differential privacy (the mechanism of ``privacy.mode`` is enabled) the train handler runs
:func:`fedmeta.privacy.client_update.private_round` instead: under ``client-local`` the client
clips and noises its own update, under ``task`` the site runs Opacus' DP-SGD over its task pool;
the reply then carries only the privatized update, a nominal task count and ``privacy.*``
scalars (:func:`fedmeta.privacy.releasable_metrics`). The client's accountant lives in the
node's ``context.state`` for the run and, written atomically after every round, in a file in the
node's ``privacy-state-dir`` (node config), else the folder the app was built with, else
:func:`fedmeta.flower.env.default_privacy_state_dir` (``$FLWR_HOME/fedmeta/privacy``): a
SuperNode restart or a new run continues it. A client whose own budget is spent answers with an
error and sends nothing.

A site pins its own privacy floor in its node config (``privacy-mode``,
``privacy-min-noise-multiplier``, ``privacy-max-epsilon``, ``privacy-max-delta``,
``privacy-max-clip-norm``; :mod:`fedmeta.privacy.site_floor`): the run config comes from whoever
submits the run, so before the train and evaluate handlers compute anything they check it against
that floor, and a run that asks for less gets an error reply (``PrivacyFloorViolated: ...``, a
failed client on the server) and an error in the site's log.

Apart from that privacy state, clients are stateless between messages: task data exists only
while a handler runs. The :class:`~fedmeta.experiment.Experiment` (model skeleton, algorithm,
task family — for a site, its files) is a pure function of the config and data folder and is memoized per process, which
in simulation is a Ray actor serving many virtual clients.

:func:`build_client_app` without a config builds the app ``flwr run`` loads (``client/app.py``),
which reads its config from ``context.run_config``; with one it binds that config directly
(``fedmeta simulate``, whose run_config is empty). It takes Flower mods per handler (e.g.
differential-privacy mods on ``train`` only).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmeta.config import Config
from fedmeta.errors import BudgetExhausted, ConfigError, PrivacyFloorViolated
from fedmeta.experiment import Experiment
from fedmeta.federation import (
    COMPUTE_SECONDS,
    check_received_meta,
    describe_client,
    evaluate_on_client,
    resolve_client_id,
    train_on_client,
)
from fedmeta.flower import records as fl
from fedmeta.flower.env import default_privacy_state_dir
from fedmeta.flower.run_config import run_settings
from fedmeta.privacy.mechanisms import CLIP_NORM_KEY, mechanism_for
from fedmeta.privacy.site_floor import SiteFloor
from fedmeta.types import Params

__all__ = ["build_client_app"]

log = logging.getLogger(__name__)


def _floor_refusal(cfg: Config, context: Context, message: Message) -> Message | None:
    """An error reply when the run asks for less privacy than the node config's floor, else ``None``.

    A malformed floor refuses too (the site's operator must fix its node config; training without
    the floor it meant to pin would be worse).
    """
    try:
        SiteFloor.from_node_config(context.node_config).check(cfg)
    except (PrivacyFloorViolated, ConfigError) as exc:
        kind = type(exc).__name__
        log.error("%s: %s", kind, exc)
        return fl.reply_error(message, f"{kind}: {exc}")
    return None


@functools.lru_cache(maxsize=4)
def _experiment(cfg: Config, data_dir: str | None) -> Experiment:
    return Experiment(cfg, data_dir=data_dir)


@functools.lru_cache(maxsize=1)
def _rdp_curves() -> dict[tuple[float, float], Any]:
    """Opacus' per-step RDP curves by (sigma, q), a pure function of them, kept per process.

    Clients rebuild their accountants from their node state every round, and a curve at q < 1
    costs ~0.3 s. A function, not a module-level dict: in simulation the handlers travel to the
    Ray actors by value with every message (cloudpickle copies the dicts they use), while a
    module-level function is looked up in the actor's own module, like :func:`_experiment`.
    """
    return {}


@functools.lru_cache(maxsize=4)
def _run_config(items: tuple[tuple[str, Any], ...], app_dir: Path | None) -> Config:
    cfg, _ = run_settings(dict(items), app_dir=app_dir)
    return cfg


def build_client_app(
    cfg: Config | None = None,
    *,
    mods: Sequence[Any] = (),
    train_mods: Sequence[Any] = (),
    evaluate_mods: Sequence[Any] = (),
    privacy_state_dir: str | Path | None = None,
    app_dir: str | Path | None = None,
) -> ClientApp:
    """A fedmeta ``ClientApp``.

    Args:
        cfg: the run config; ``None`` reads it from ``context.run_config`` on every message.
        mods: Flower mods around every handler.
        train_mods: Flower mods around the train handler only (e.g. client-side DP).
        evaluate_mods: Flower mods around the evaluate handler only.
        privacy_state_dir: where clients keep their privacy accountants across runs and restarts (a
            node's ``privacy-state-dir`` node config takes precedence; default
            :func:`~fedmeta.flower.env.default_privacy_state_dir`).
        app_dir: the app directory (repository root or unpacked app bundle) where a relative
            ``config-file`` of the run_config is looked up first (``cfg=None`` only).

    Returns:
        The ``ClientApp``.
    """
    app = ClientApp(mods=list(mods))
    base = Path(app_dir) if app_dir is not None else None

    def setup(context: Context) -> tuple[Experiment, int | None, str | None]:
        config = cfg if cfg is not None else _run_config(tuple(sorted(context.run_config.items())), base)
        own_id, data_dir = fl.node_settings(context)
        return _experiment(config, data_dir), own_id, data_dir

    def instructed(message: Message, context: Context) -> tuple[Experiment, Params, dict[str, Any], int] | Message:
        """The experiment, the meta-parameters and config of train/evaluate instructions, and the
        client they address; or the error reply when the run asks less privacy than the site's floor."""
        exp, own_id, _ = setup(context)
        refusal = _floor_refusal(exp.cfg, context, message)
        if refusal is not None:
            return refusal
        meta, config = fl.unpack_instructions(message)
        return exp, meta, config, resolve_client_id(own_id, _int_or_none(config.get("client-id")))

    @app.query()
    def query(message: Message, context: Context) -> Message:
        exp, own_id, data_dir = setup(context)
        return Message(fl.pack_identity(describe_client(exp, own_id, data_dir)), reply_to=message)

    def secure_sum(message: Message, context: Context, call_next: Any) -> Message:
        """Under a secure-sum mode (client-distributed) the train handler runs inside SecAgg+."""
        exp, _, _ = setup(context)
        if not mechanism_for(exp.cfg).secure_sum:
            return call_next(message, context)
        from fedmeta.flower.secagg import secure_sum_mod

        return secure_sum_mod(exp, message, context, call_next)

    @app.train(mods=[*train_mods, secure_sum])
    def train(message: Message, context: Context) -> Message:
        started = time.perf_counter()
        exp, own_id, _ = setup(context)
        if mechanism_for(exp.cfg).secure_sum:  # SecAgg+'s masked-vector stage: a legacy FitRes, no metrics
            refusal = _floor_refusal(exp.cfg, context, message)
            if refusal is not None:
                return refusal
            from fedmeta.flower.secagg import secure_train_reply

            return secure_train_reply(exp, message, own_id)
        opened = instructed(message, context)
        if isinstance(opened, Message):
            return opened
        exp, meta, config, client_id = opened
        round_idx = int(config["round"])
        if not mechanism_for(exp.cfg).enabled:
            update = train_on_client(exp, meta, round_idx, client_id)
            return Message(fl.pack_update(update, {COMPUTE_SECONDS: time.perf_counter() - started}), reply_to=message)
        from fedmeta.privacy.client_update import private_round

        check_received_meta(exp, meta)
        node_dir = context.node_config.get("privacy-state-dir")
        # persisted by default: a site's budget must survive a SuperNode restart (context.state does not)
        state_dir = str(node_dir) if node_dir not in (None, "") else privacy_state_dir
        state_dir = state_dir or default_privacy_state_dir()
        try:
            update, releasable, state = private_round(
                exp, meta, round_idx, client_id, state=fl.load_node_state(context, fl.PRIVACY_STATE),
                clip_norm=_float_or_none(config.get(CLIP_NORM_KEY)), state_dir=state_dir, rdp_cache=_rdp_curves(),
            )  # fmt: skip
        except BudgetExhausted as exc:
            return fl.reply_error(message, f"BudgetExhausted: {exc}")
        if state:
            fl.store_node_state(context, fl.PRIVACY_STATE, state)
        # only the privatized update, a nominal task count and privacy.* scalars leave the client
        return Message(fl.pack_update(update, releasable), reply_to=message)

    @app.train("cohort", mods=list(train_mods))
    def train_cohort(message: Message, context: Context) -> Message:
        """A pooled simulation node (``simulation.pool``): one reply for all the logical clients it plays."""
        from fedmeta.flower.pool import play_train_cohort, unpack_cohort_instructions

        started = time.perf_counter()
        exp, _, _ = setup(context)
        refusal = _floor_refusal(exp.cfg, context, message)
        if refusal is not None:
            return refusal
        meta, config, client_ids = unpack_cohort_instructions(message)
        node_dir = context.node_config.get("privacy-state-dir")
        state_dir = str(node_dir) if node_dir not in (None, "") else privacy_state_dir
        state_dir = (state_dir or default_privacy_state_dir()) if mechanism_for(exp.cfg).enabled else None
        content = play_train_cohort(exp, meta, config, client_ids, state_dir=state_dir, rdp_cache=_rdp_curves())
        log.debug("pooled node: %d clients in %.3fs", len(client_ids), time.perf_counter() - started)
        return Message(content, reply_to=message)

    @app.evaluate("cohort", mods=list(evaluate_mods))
    def evaluate_cohort(message: Message, context: Context) -> Message:
        """A pooled simulation node's federated evaluation of the logical clients it plays."""
        from fedmeta.flower.pool import play_evaluate_cohort, unpack_cohort_instructions

        exp, _, _ = setup(context)
        refusal = _floor_refusal(exp.cfg, context, message)
        if refusal is not None:
            return refusal
        meta, config, client_ids = unpack_cohort_instructions(message)
        return Message(play_evaluate_cohort(exp, meta, config, client_ids), reply_to=message)

    @app.evaluate(mods=list(evaluate_mods))
    def evaluate(message: Message, context: Context) -> Message:
        opened = instructed(message, context)
        if isinstance(opened, Message):
            return opened
        exp, meta, config, client_id = opened
        metrics, num_tasks = evaluate_on_client(exp, meta, client_id, num_tasks=int(config["eval-tasks"]))
        return Message(fl.pack_eval_metrics(metrics, num_tasks), reply_to=message)

    return app


def _int_or_none(value: Any) -> int | None:
    return None if value is None else int(value)


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)
