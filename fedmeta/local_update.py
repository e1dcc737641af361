"""Several local meta-steps per round: a client's pseudo-gradient (FedMeta / FedAvg-style).

With ``meta.local_steps = K > 1`` a client does not send the meta-gradient of one meta-batch:
it takes ``K`` plain SGD steps on its copy of the meta-parameters (Meta-SGD rates included),
each on the mean meta-gradient of a fresh meta-batch of ``meta.tasks_per_client`` tasks, and
sends the model delta scaled by the step size, ``(θ_0 − θ_K) / η = Σ_k g_k``. The server treats
it as a pseudo-gradient for its optimizer, as FedOpt does with FedAvg's deltas (Reddi et al.,
2021, "Adaptive Federated Optimization"); with plain server SGD of rate η_s = η this is
FedAvg with local SGD (McMahan et al., 2017), and with a meta-gradient inside it is the
FedMeta recipe (Chen et al., 2018, "Federated Meta-Learning with Fast Convergence and Efficient
Communication"): more computation per round, fewer rounds and bytes.

The Flower client (through :meth:`fedmeta.experiment.Experiment.client_update`) and the
centralized reference (:meth:`~fedmeta.experiment.Experiment.round_updates`, vectorized over the
cohort) both run :func:`local_meta_updates`, so the two paths do the same math.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.func import vmap

from fedmeta.algorithms import MetaAlgorithm, MetaUpdate
from fedmeta.types import Params, TaskBatch

__all__ = ["local_meta_update", "local_meta_updates"]


def local_meta_update(algorithm: MetaAlgorithm, meta: Params, batches: Sequence[TaskBatch], *, lr: float) -> MetaUpdate:
    """One client's local meta-steps: :func:`local_meta_updates` for a single client.

    Args:
        algorithm: the meta-learning algorithm (its meta-gradient drives each local step).
        meta: the meta-parameters received from the server (never modified).
        batches: one meta-batch per local step, in order.
        lr: the local step size ``η`` (``meta.local_lr``).

    Returns:
        The client's :class:`MetaUpdate` (see :func:`local_meta_updates`). With one batch it is
        exactly that batch's mean meta-gradient.

    Raises:
        ValueError: if ``batches`` is empty or ``lr`` is not positive.
    """
    if len(batches) == 1:
        return algorithm.meta_gradient(meta, batches[0])
    return local_meta_updates(algorithm, meta, [[b] for b in batches], lr=lr)[0]


def local_meta_updates(
    algorithm: MetaAlgorithm, meta: Params, steps: Sequence[Sequence[TaskBatch]], *, lr: float
) -> list[MetaUpdate]:
    """Local meta-steps of several clients at once, vectorized over clients with ``vmap``.

    Every client starts from ``meta`` and takes one SGD step per local step on the mean
    meta-gradient of its own meta-batch for that step; the clients' parameters evolve apart, so
    they are carried as a stacked ``[C, *shape]`` dict and each step is one ``vmap`` over clients
    of the algorithm's ``vmap`` over tasks. The Flower client calls this with ``C = 1`` and the
    centralized reference with the whole cohort: one function, the same math.

    Args:
        algorithm: the meta-learning algorithm.
        meta: the meta-parameters received from the server (never modified).
        steps: ``steps[k][c]`` is client ``c``'s meta-batch for local step ``k``; the batches of
            one client all hold the same number of tasks.
        lr: the local step size ``η``.

    Returns:
        One :class:`MetaUpdate` per client: ``gradient`` is ``Σ_k g_k = (θ_0 − θ_K) / η``
        (summed directly, which keeps float32 precision), ``num_tasks`` the tasks of all its
        steps and ``metrics`` their means.

    Raises:
        ValueError: if there are no steps or clients, ``lr`` is not positive, or the algorithm
            carries objective terms (they need the whole meta-batch, which this vmap does not give).
    """
    if not steps or not steps[0]:
        raise ValueError("local_meta_updates needs at least one step and one client")
    if algorithm.terms:
        raise ValueError("objective terms are not supported with several local meta-steps (meta.local_steps > 1) yet")
    if lr <= 0:
        raise ValueError(f"local step size must be positive, got {lr}")
    clients = len(steps[0])
    if any(len(step) != clients for step in steps):
        raise ValueError("every local step needs one meta-batch per client")
    current = {k: v.detach().unsqueeze(0).expand(clients, *v.shape).clone() for k, v in meta.items()}
    total: Params = {k: torch.zeros_like(v) for k, v in current.items()}
    sums: dict[str, torch.Tensor] = {}

    def client_step(
        params: Params, sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
    ) -> tuple[Params, dict[str, torch.Tensor]]:
        grads, metrics = vmap(algorithm.task_update, in_dims=(None, 0, 0, 0, 0))(params, sx, sy, qx, qy)
        return {k: v.mean(dim=0) for k, v in grads.items()}, {k: v.mean(dim=0) for k, v in metrics.items()}

    batched = vmap(client_step)
    tasks = [0] * clients
    for step in steps:
        sx, sy, qx, qy = (
            torch.stack([getattr(b, f) for b in step]) for f in ("support_x", "support_y", "query_x", "query_y")
        )
        grads, metrics = batched(current, sx, sy, qx, qy)
        grads = {k: v.detach() for k, v in grads.items()}
        current = {k: current[k] - lr * grads[k] for k in current}
        total = {k: total[k] + grads[k] for k in total}
        for name, value in metrics.items():
            sums[name] = sums.get(name, torch.zeros(clients, dtype=torch.float64)) + value.detach().double()
        tasks = [t + b.num_tasks for t, b in zip(tasks, step)]
    n_steps = len(steps)
    return [
        MetaUpdate(
            gradient={k: v[c] for k, v in total.items()},
            num_tasks=tasks[c],
            metrics={name: float(v[c]) / n_steps for name, v in sums.items()},
        )
        for c in range(clients)
    ]
