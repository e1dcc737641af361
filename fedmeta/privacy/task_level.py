"""Task-level DP inside a site, with Opacus' DP optimizer and accountant.

A site (a hospital with many patients, one task each) holds a pool of tasks. Each time it takes
part in a round it runs one step of DP-SGD (Abadi et al., 2016) over that pool:

1. every task joins the local meta-batch independently with probability
   ``q = tasks_per_client / pool_size`` (Poisson sampling, drawn from a secret generator);
2. the per-task meta-gradients (second-order MAML, Meta-SGD rates included, computed with
   ``torch.func``) are handed to Opacus' ``DPOptimizer`` as per-sample gradients; it clips each
   to ``clip_norm``, sums them, adds ``N(0, (z C)^2)`` and divides by the expected batch size;
3. Opacus' accountant, hooked to that optimizer, records the step with ``(z, q)``.

Opacus cannot differentiate through an inner loop itself, so it receives whole per-task
meta-gradients: a task is the "sample" whose influence the clipping bounds. The accountant is the
site's for as long as the site exists (its state travels in the site's persistent state, never
one per round), and the site reports its own ``(epsilon, delta)``. With ``target_epsilon`` set the
site refuses a step that would exceed it, whatever the server asks.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from fedmeta.config import Config
from fedmeta.errors import BudgetExhausted
from fedmeta.privacy.accountant import PrivacyAccountant
from fedmeta.privacy.modes import task_sample_rate
from fedmeta.tasks import TaskSource
from fedmeta.types import Params, TaskBatch

__all__ = ["TaskLevelPrivacy", "poisson_indices", "site_pool_size", "sample_site_tasks"]

log = logging.getLogger(__name__)


def poisson_indices(pool_size: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    """Indices of a Poisson sample: each of ``pool_size`` items kept independently with ``sample_rate``."""
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
    return torch.nonzero(torch.rand(pool_size, generator=generator) < sample_rate).flatten()


def site_pool_size(source: TaskSource, client_id: int) -> int:
    """How many tasks site ``client_id`` holds: its stored tasks (folder) or ``task.tasks_per_site``.

    Raises:
        ValueError: when the site has no fixed pool (tasks drawn fresh every round).
    """
    cfg = source.cfg
    if source.num_sites is not None:  # site folders (a class-folder tree has a task.tasks_per_site pool)
        family = source.family(client_id)
        return len(family.tasks("train"))  # type: ignore[attr-defined]
    if cfg.task.tasks_per_site is None:
        raise ValueError("task-level DP needs a fixed pool of tasks per site: set task.tasks_per_site")
    return int(cfg.task.tasks_per_site)


def sample_site_tasks(
    source: TaskSource, client_id: int, *, sample_rate: float, generator: torch.Generator
) -> TaskBatch | None:
    """The site's Poisson-sampled meta-batch for one DP step (``None`` if no task was drawn).

    The selection and the support/query draws both come from ``generator``, which must be secret
    (see :mod:`fedmeta.privacy.randomness`): a selection the server could recompute would void
    the amplification by subsampling.
    """
    pool = site_pool_size(source, client_id)
    chosen = poisson_indices(pool, sample_rate, generator)
    if chosen.numel() == 0:
        return None
    family = source.family(client_id)
    if source.num_sites is not None:  # site folders (a class-folder tree has a task.tasks_per_site pool)
        # FolderFamily describes a task by (index, split); split 0 is "train"
        params = torch.stack([chosen.float(), torch.zeros(chosen.numel())], dim=1)
    else:
        pool_params = source.site_pool(client_id)
        assert pool_params is not None
        params = pool_params[chosen]
    return family.make_tasks(params, generator)


class TaskLevelPrivacy:
    """A site's task-level DP: Opacus clipping/noise of per-task meta-gradients, and its accountant.

    Args:
        noise_multiplier: ``z``; the noise std on the clipped sum is ``z * clip_norm``.
        clip_norm: per-task bound ``C`` on the meta-gradient's global L2 norm.
        sample_rate: ``q``, the Poisson rate of a task in the site's meta-batch.
        expected_tasks: ``q * pool_size``, the divisor of the noisy sum.
        delta: the site's delta.
        accountant: Opacus mechanism.
        target_epsilon: the site's own budget (``None``: unlimited).
        state: a :meth:`state_dict` from an earlier round (the accountant persists).
        rdp_cache: RDP curves shared across rounds (see :class:`PrivacyAccountant`).
    """

    def __init__(
        self,
        *,
        noise_multiplier: float,
        clip_norm: float,
        sample_rate: float,
        expected_tasks: float,
        delta: float,
        accountant: str = "rdp",
        target_epsilon: float | None = None,
        state: dict[str, Any] | None = None,
        rdp_cache: dict[tuple[float, float], Any] | None = None,
    ) -> None:
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"noise_multiplier must be a non-negative number, got {noise_multiplier!r}")
        if not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"clip_norm must be a positive number, got {clip_norm!r}")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must lie in (0, 1], got {sample_rate!r}")
        if not expected_tasks > 0:
            raise ValueError(f"expected_tasks must be positive, got {expected_tasks!r}")
        self.noise_multiplier = float(noise_multiplier)
        self.clip_norm = float(clip_norm)
        self.sample_rate = float(sample_rate)
        self.expected_tasks = float(expected_tasks)
        self.delta = float(delta)
        self.target_epsilon = target_epsilon
        self.accountant = PrivacyAccountant(accountant, rdp_cache=rdp_cache)
        if state is not None:
            self.load_state_dict(state)

    @classmethod
    def from_config(
        cls,
        cfg: Config,
        *,
        pool_size: int,
        state: dict[str, Any] | None = None,
        rdp_cache: dict[tuple[float, float], Any] | None = None,
    ) -> TaskLevelPrivacy:
        """The task-level DP of a site holding ``pool_size`` tasks under ``cfg``."""
        p = cfg.privacy
        q = task_sample_rate(cfg.meta.tasks_per_client, pool_size)
        return cls(
            noise_multiplier=p.noise_multiplier,
            clip_norm=p.clip_norm,
            sample_rate=q,
            expected_tasks=q * pool_size,
            delta=p.delta,
            accountant=p.accountant,
            target_epsilon=p.target_epsilon,
            state=state,
            rdp_cache=rdp_cache,
        )

    # -- budget --------------------------------------------------------------------------------

    def epsilon(self) -> float:
        """The site's epsilon so far at its delta."""
        return self.accountant.get_epsilon(self.delta)

    def epsilon_after_next_step(self) -> float:
        """What the site's epsilon would be after one more step."""
        probe = PrivacyAccountant.from_state_dict(self.accountant.state_dict(), rdp_cache=self.accountant.rdp_cache)
        probe.step(noise_multiplier=self.noise_multiplier, sample_rate=self.sample_rate)
        return probe.get_epsilon(self.delta)

    def check_budget(self) -> None:
        """Raise :class:`BudgetExhausted` if one more step would exceed the site's target epsilon."""
        if self.target_epsilon is None:
            return
        nxt = self.epsilon_after_next_step()
        if nxt > self.target_epsilon:
            raise BudgetExhausted(
                f"this site's task-level privacy budget is spent: after {self.accountant.steps} steps "
                f"epsilon={self.epsilon():.4g}, one more would reach {nxt:.4g} > "
                f"privacy.target_epsilon={self.target_epsilon:g} (delta={self.delta:g})"
            )

    # -- one DP step ---------------------------------------------------------------------------

    def privatize(self, per_task: Params | None, *, reference: Params, generator: torch.Generator) -> Params:
        """One DP-SGD step over the site's sampled tasks: clipped, noised, averaged meta-gradient.

        Args:
            per_task: ``{name: [T, *shape]}`` per-task meta-gradients of the Poisson-sampled
                meta-batch (``None`` or ``T = 0`` when no task was drawn: the site still sends
                pure noise, as Poisson DP-SGD requires).
            reference: the meta-parameters (keys, shapes, dtypes).
            generator: the noise source (secret; see :mod:`fedmeta.privacy.randomness`).

        Returns:
            ``(sum_t clip(g_t, C) + N(0, (z C)^2)) / (q * pool_size)``, keyed like ``reference``.

        Raises:
            BudgetExhausted: if the step would exceed the site's target epsilon (nothing is
                computed and the accountant does not move).
            ValueError: if ``per_task`` does not match ``reference``.
        """
        from opacus.optimizers import DPOptimizer

        self.check_budget()
        keys = list(reference)
        if per_task is not None:
            if set(per_task) != set(keys):
                raise ValueError(f"per-task gradients have keys {sorted(per_task)}, expected {sorted(keys)}")
            sizes = {int(per_task[k].shape[0]) for k in keys}
            if len(sizes) != 1:
                raise ValueError(f"per-task gradients disagree on the number of tasks: {sorted(sizes)}")
            for k in keys:
                if tuple(per_task[k].shape[1:]) != tuple(reference[k].shape):
                    raise ValueError(
                        f"per-task gradient '{k}' has shape {tuple(per_task[k].shape)}, expected [T, "
                        f"*{tuple(reference[k].shape)}]"
                    )
        leaves = [torch.nn.Parameter(torch.zeros_like(reference[k])) for k in keys]
        optimizer = DPOptimizer(
            torch.optim.SGD(leaves, lr=0.0),
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.clip_norm,
            expected_batch_size=self.expected_tasks,
            loss_reduction="mean",
            generator=generator,
        )
        optimizer.attach_step_hook(self.accountant.opacus.get_optimizer_hook_fn(sample_rate=self.sample_rate))
        for leaf, k in zip(leaves, keys):
            # Opacus reads per-sample gradients from this attribute (its GradSampleModule sets it)
            if per_task is None:
                leaf.grad_sample = torch.zeros((0, *leaf.shape), dtype=leaf.dtype)  # type: ignore[attr-defined]
            else:
                leaf.grad_sample = per_task[k].detach().to(leaf.dtype)  # type: ignore[attr-defined]
        optimizer.pre_step()
        out = {k: leaf.grad.detach().clone() for k, leaf in zip(keys, leaves)}  # type: ignore[union-attr]
        log.info(
            "task-level DP step %d: epsilon=%.4g at delta=%g (noise_multiplier %g, sample rate %.4g)",
            self.accountant.steps, self.epsilon(), self.delta, self.noise_multiplier, self.sample_rate,
        )  # fmt: skip
        return out

    # -- reporting and persistence -------------------------------------------------------------

    def report(self) -> dict[str, float]:
        """The site's own privacy, as scalars: epsilon, delta and steps.

        Safe to log and to send when the sample rate is public (``from_config`` takes it from
        ``task.tasks_per_site``): then they are functions of public parameters and of the rounds
        the site took part in. The sample rate itself is never reported.
        """
        eps = self.epsilon()
        return {
            "privacy.epsilon": eps if math.isfinite(eps) else float("inf"),
            "privacy.delta": self.delta,
            "privacy.steps": float(self.accountant.steps),
        }

    def state_dict(self) -> dict[str, Any]:
        """The accountant's history (flat lists; fits a Flower ``ConfigRecord``)."""
        return self.accountant.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the accountant (see :meth:`PrivacyAccountant.load_state_dict`)."""
        self.accountant.load_state_dict(state)
