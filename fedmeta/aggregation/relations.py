"""TRLearner's federated variant: the server weights clients by the relations of their meta-updates.

``meta.trlearner.federated`` (docs/trlearner.md, "Federated variant"). The server treats each
client's update ``u_c`` as that client's task embedding. Heads are the parameter tensors: head
``k`` compares the clients' updates of tensor ``k`` by cosine similarity, and the relation of two
clients is the mean over heads, ``S_cd = (1/K) Σ_k cos(u_c^k, u_d^k)`` (symmetric). The rows are
normalized as in the term (:func:`fedmeta.algorithms.trlearner.relation_matrix`'s rule):
``M_cd = exp(S_cd/τ) / Σ_{e≠c} exp(S_ce/τ)``, ``M_cc = 0``. Then:

* ``weights``: every client's update is replaced by its relation-weighted neighbourhood,
  ``ũ_c = Σ_d M_cd u_d``, and the aggregate is their mean, ``Σ_d w_d u_d`` with
  ``w_d = (1/C) Σ_c M_cd`` (the weights sum to 1): a client many others relate to counts more, an
  update unlike every other counts little;
* ``consistency``: each update is pulled towards its neighbourhood by ``λ`` (``meta.trlearner.weight``,
  in [0, 1]), ``ũ_c = u_c + λ (Σ_d M_cd u_d - u_c)``: the mean of those, ``(1 - λ) mean + λ weights``.

Every client counts once: the task counts clients declare are not used. The weights are a function
of the updates the server received and of public settings only, so where those updates are already
privatized (no DP, ``client-local``, ``task``) this is post-processing and costs no ε; under
``client-central`` the updates are raw and the mechanism refuses it (``accepts_update_relations``).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from fedmeta.aggregation.base import Aggregator
from fedmeta.errors import ConfigError
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = ["RelationWeighted", "client_relations", "FEDERATED"]

#: ``meta.trlearner.federated``
FEDERATED = ("off", "weights", "consistency")


def client_relations(updates: Params, *, temperature: float) -> Tensor:
    """``M`` ``[C, C]`` over the stacked updates ``{key: [C, *shape]}`` (one head per tensor), float64."""
    heads = []
    for v in updates.values():
        flat = v.reshape(v.shape[0], -1).to(torch.float64)
        unit = flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-300)
        heads.append(unit @ unit.T)
    similarity = torch.stack(heads).mean(dim=0)
    clients = similarity.shape[0]
    if clients == 1:
        return torch.zeros_like(similarity)
    eye = torch.eye(clients, dtype=torch.bool)
    return torch.softmax((similarity / temperature).masked_fill(eye, float("-inf")), dim=-1)


class RelationWeighted(Aggregator):
    """The federated variant as an aggregation rule (module docstring); chosen by ``meta.trlearner.federated``.

    Args:
        form: ``weights`` or ``consistency``.
        temperature: ``τ`` (``meta.trlearner.temperature``).
        pull: ``λ`` of ``consistency`` (``meta.trlearner.weight``).
    """

    def __init__(self, form: str, *, temperature: float, pull: float = 1.0) -> None:
        self.form, self.temperature, self.pull = form, temperature, pull

    @classmethod
    def from_config(cls, cfg: Config) -> RelationWeighted:
        """From ``meta.trlearner`` (``federated``, ``temperature``, ``weight``)."""
        cls.check_config(cfg)
        t = cfg.meta.trlearner
        return cls(t.federated, temperature=t.temperature, pull=t.weight if t.federated == "consistency" else 1.0)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``meta.trlearner.federated`` known; it replaces ``mean`` (no other rule under it); ``λ`` in [0, 1].

        Raises:
            ConfigError: naming the key.
        """
        t = cfg.meta.trlearner
        if t.federated not in FEDERATED:
            raise ConfigError(
                f"config key 'meta.trlearner.federated' must be one of {', '.join(FEDERATED)}, got {t.federated!r}"
            )
        if t.federated == "off":
            return
        if cfg.federation.aggregation != "mean":
            raise ConfigError(
                f"config key 'federation.aggregation' must be 'mean' with meta.trlearner.federated {t.federated!r} "
                f"(the relation weighting is the aggregation rule), got {cfg.federation.aggregation!r}"
            )
        if not (t.temperature > 0 and math.isfinite(t.temperature)):
            raise ConfigError(f"config key 'meta.trlearner.temperature' must be a positive number, got {t.temperature}")
        if t.federated == "consistency" and not 0 <= t.weight <= 1:
            raise ConfigError(
                f"config key 'meta.trlearner.weight' must be in [0, 1] with meta.trlearner.federated 'consistency' "
                f"(how far each update moves towards its neighbours), got {t.weight}"
            )

    def client_weights(self, updates: Params) -> Tensor:
        """``[C]`` float64 weights summing to 1 that the aggregate gives each client's update."""
        count = next(iter(updates.values())).shape[0]
        uniform = torch.full((count,), 1.0 / count, dtype=torch.float64)
        if count == 1:
            return uniform
        relational = client_relations(updates, temperature=self.temperature).mean(dim=0)
        return (1.0 - self.pull) * uniform + self.pull * relational

    def aggregate(self, updates: Params, weights: Tensor, *, reference: Params | None = None) -> Params:
        """``Σ_c w_c u_c`` with :meth:`client_weights` (the declared ``weights`` are not used)."""
        w = self.client_weights(updates)
        return {k: torch.einsum("c,c...->...", w.to(v.dtype), v) for k, v in updates.items()}
