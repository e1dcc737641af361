"""What a client computes and sends in one round under each privacy mode (the mechanism's client side).

The Flower ``ClientApp`` and the centralized reference both call these functions, so a DP run
does the same math on both paths (with ``privacy.noise_seed`` fixed they release the same
aggregates; ``tests/integration/test_privacy_simulation.py`` checks it):

* ``none`` / ``client-central``: the client's mean meta-update (:meth:`Experiment.client_update`),
  unchanged; the trusted server clips and noises it (:class:`~fedmeta.privacy.facade.ServerPrivacy`).
* ``client-local``: that update clipped to ``C`` with ``N(0, (z C)^2)`` added by the client itself
  (:meth:`ClientPrivacy.privatize_update`).
* ``task``: ``meta.local_steps`` steps of DP-SGD over the site's tasks (Abadi et al., 2016):
  each step Poisson-samples the site's pool, computes exact per-task meta-gradients with
  ``torch.func`` at the client's current parameters, and lets Opacus clip, noise and average them
  (:meth:`ClientPrivacy.privatize_task_gradients`); the client sends the sum of the privatized
  steps, ``(θ_0 − θ_K) / η``, as :func:`fedmeta.local_update.local_meta_updates` does without DP.

Each bullet is the client side of a :class:`~fedmeta.privacy.mechanisms.PrivacyMechanism`
(:meth:`~fedmeta.privacy.mechanisms.PrivacyMechanism.client_update`); this module runs it for one
client and carries its state between rounds.

Under every DP mode the reply carries only what :func:`releasable_metrics` allows (``privacy.*``
scalars) and a *nominal* task count, ``meta.tasks_per_client × meta.local_steps``: the real
count of a Poisson-sampled meta-batch is exactly what task-level DP hides (Opacus divides by the
expected batch size for that reason), and under client-level DP the size of a site's data is not
covered by ε either.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmeta.algorithms import MetaUpdate
from fedmeta.checkpoint import atomic_write_bytes
from fedmeta.config import Config
from fedmeta.errors import CheckpointError
from fedmeta.experiment import Experiment
from fedmeta.privacy.facade import ClientPrivacy
from fedmeta.privacy.mechanisms import TrainInstruction, mechanism_for
from fedmeta.privacy.mechanisms.task import private_task_update
from fedmeta.types import Params

__all__ = [
    "nominal_num_tasks",
    "privatize_client_update",
    "private_task_update",
    "private_client_update",
    "private_round",
    "client_state_path",
    "load_client_state",
    "save_client_state",
]

log = logging.getLogger(__name__)


def nominal_num_tasks(cfg: Config) -> int:
    """The task count a DP client reports: ``meta.tasks_per_client × meta.local_steps`` (public)."""
    return int(cfg.meta.tasks_per_client * cfg.meta.local_steps)


def privatize_client_update(
    cfg: Config, privacy: ClientPrivacy, update: MetaUpdate, *, round_idx: int, clip_norm: float | None = None
) -> tuple[MetaUpdate, dict[str, float]]:
    """Turn a client's computed update into what it may send (client-level modes and ``none``).

    Args:
        cfg: the client's own configuration.
        privacy: the client's :class:`ClientPrivacy` (its accountant is stepped under client-local).
        update: the client's mean meta-update (:meth:`Experiment.client_update`).
        round_idx: the round (keys the noise stream).
        clip_norm: the clip norm the server sent (client-local; default ``privacy.clip_norm``).

    Returns:
        The update to send (under DP: privatized if client-local, with no training metrics and the
        nominal task count) and the releasable ``privacy.*`` scalars to send with it.

    Raises:
        BudgetExhausted: if a client-local client's own budget would be exceeded.
        ValueError: in ``task`` mode (use :func:`private_task_update`).
    """
    return mechanism_for(cfg).privatize_client_update(cfg, privacy, update, round_idx=round_idx, clip_norm=clip_norm)


def private_client_update(
    exp: Experiment,
    meta: Params,
    round_idx: int,
    client_id: int,
    privacy: ClientPrivacy,
    *,
    clip_norm: float | None = None,
) -> tuple[MetaUpdate, dict[str, float]]:
    """Everything a client computes for a train instruction under its privacy mode.

    ``task``: :func:`private_task_update`; other modes: :meth:`Experiment.client_update` followed
    by :func:`privatize_client_update`.

    Returns:
        The update to send and the releasable metrics to send with it (without DP: the update's
        own metrics, unchanged).
    """
    train = TrainInstruction(meta, round_idx, client_id, clip_norm)
    return mechanism_for(exp.cfg).client_update(exp, privacy, train)


# -- the client's privacy state between rounds and runs ----------------------------------------


def client_state_path(state_dir: str | Path, client_id: int, mode: str) -> Path:
    """Where a client keeps its privacy state on disk (one file per client and mode)."""
    return Path(state_dir) / f"client-{int(client_id)}.{mode}.json"


def load_client_state(state_dir: str | Path, client_id: int, mode: str) -> dict[str, Any] | None:
    """A client's saved privacy state (its accountant's history), or ``None`` if it has none.

    Raises:
        CheckpointError: if the file exists but cannot be read as a privacy state.
    """
    path = client_state_path(state_dir, client_id, mode)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        if (
            data.get("client_id") != int(client_id)
            or data.get("mode") != mode
            or not isinstance(data.get("state"), dict)
        ):
            raise ValueError("it belongs to another client or privacy mode")
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"client privacy state '{path}' cannot be read: {exc}") from exc
    return dict(data["state"])


def save_client_state(state_dir: str | Path, client_id: int, mode: str, state: Mapping[str, Any]) -> Path:
    """Write a client's privacy state atomically (see :func:`load_client_state`)."""
    path = client_state_path(state_dir, client_id, mode)
    payload = {"client_id": int(client_id), "mode": mode, "state": dict(state)}
    atomic_write_bytes(path, json.dumps(payload, sort_keys=True).encode("utf-8"))
    return path


def private_round(
    exp: Experiment,
    meta: Params,
    round_idx: int,
    client_id: int,
    *,
    state: Mapping[str, Any] | None,
    clip_norm: float | None = None,
    state_dir: str | Path | None = None,
    rdp_cache: dict[tuple[float, float], Any] | None = None,
) -> tuple[MetaUpdate, dict[str, float], dict[str, Any]]:
    """One client's train step under DP, with its privacy state carried in and out.

    The state (the accountant of a client-local client or a task-level site) comes from the
    node's memory of this run (``state``) or, on the first round of a run, from ``state_dir``
    when the site keeps one (so that an accountant outlives a server restart); it is written
    back there after the update.

    Args:
        exp: the client's experiment.
        meta: the received meta-parameters.
        round_idx: the round.
        client_id: the client's id.
        state: the state kept since the previous round of this run (``None``: none yet).
        clip_norm: the clip norm the server sent (client-local).
        state_dir: a folder where the site keeps its privacy state across runs (optional).
        rdp_cache: RDP curves kept by the caller across rounds (the accountant is rebuilt from
            ``state`` every round; at ``q < 1`` a curve costs ~0.3 s to recompute).

    Returns:
        The update to send, the releasable metrics to send with it, and the new state.

    Raises:
        BudgetExhausted: if the client's own budget would be exceeded (it sends nothing).
    """
    mode = exp.cfg.privacy.mode
    if state is None and state_dir is not None:
        state = load_client_state(state_dir, client_id, mode)
    privacy = ClientPrivacy.for_site(exp.cfg, client_id, exp.source, state=state, rdp_cache=rdp_cache)
    update, extra = private_client_update(exp, meta, round_idx, client_id, privacy, clip_norm=clip_norm)
    new_state = privacy.state_dict()
    if state_dir is not None and new_state:
        save_client_state(state_dir, client_id, mode, new_state)
    return update, extra, new_state
