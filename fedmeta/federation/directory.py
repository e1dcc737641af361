"""Which node hosts which client, and the data layout the sites report.

:class:`ClientDirectory` maps client ids (what cohorts are drawn over) to transport node ids
(random, known only once a node has answered the start-up query), so that the cohort of round
``r`` is exactly ``sample_clients(seed, r, ...)`` on every transport. A server without site data
builds its model from :func:`site_layout` of the sites' answers.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

from fedmeta.config import Config
from fedmeta.errors import ConfigError
from fedmeta.federation.client import ClientIdentity
from fedmeta.tasks.base import TaskFamily
from fedmeta.types import TaskBatch

__all__ = ["ClientDirectory", "needs_site_layout", "SiteLayoutFamily", "site_layout"]

log = logging.getLogger(__name__)


class ClientDirectory:
    """Which Flower node hosts which client id.

    Flower gives nodes random ids; a client's id (simulation: its partition id; deployment: the
    site's ``client-id``) is known only on the node. Every node answers a start-up query with
    its :class:`ClientIdentity`; nodes without an id get the free ids in order of site name.

    Args:
        clients_total: ids range over ``0 .. clients_total-1``.
        kind: the task kind the server's model was built for (sites of another kind are refused).
        input_shape: the model's input shape (``None``: not checked).
        output_dim: the model's outputs (``None``: not checked).
    """

    def __init__(
        self,
        clients_total: int,
        *,
        kind: str,
        input_shape: tuple[int, ...] | None = None,
        output_dim: int | None = None,
    ) -> None:
        self.clients_total = clients_total
        self.kind = kind
        self.input_shape = input_shape
        self.output_dim = output_dim
        self._node_of: dict[int, int] = {}
        self._client_of: dict[int, int] = {}
        self._unassigned: dict[int, ClientIdentity] = {}
        self.refused: dict[int, str] = {}
        #: nodes refused because another node holds the id they claim (asked again at each refresh)
        self.contested: dict[int, str] = {}
        self.identities: dict[int, ClientIdentity] = {}

    def __len__(self) -> int:
        return len(self._node_of)

    @property
    def known_nodes(self) -> set[int]:
        """Nodes that answered (registered, waiting for an id, or refused)."""
        return set(self._client_of) | set(self._unassigned) | set(self.refused)

    def register(self, node_id: int, identity: ClientIdentity) -> str | None:
        """Record a node's answer. Returns why it was refused, or ``None``.

        A client id binds to the first node that claims it: another node claiming an id a
        registered node holds is refused (logged) and kept in :attr:`contested`, which is not
        among :attr:`known_nodes`, so it is asked again at the next refresh and takes the id once
        the holder has left (:meth:`forget`) — a site that came back with a new node id rejoins
        that way, and no registered node can take over another's client. Ids outside
        ``0 .. clients_total-1`` and mismatched data are refused.
        """
        problem = self._check(identity)
        if problem is not None:
            self.refused[node_id] = problem
            log.warning("node %s refused: %s", node_id, problem)
            return problem
        holder = self._node_of.get(identity.client_id) if identity.client_id >= 0 else None
        if holder is not None and holder != node_id:
            why = (
                f"client id {identity.client_id} is held by node {holder} (an id binds to the first node that claims "
                f"it; node {node_id} is asked again once node {holder} has left)"
            )
            self.contested[node_id] = why
            log.warning("node %s refused: %s", node_id, why)
            return why
        self.contested.pop(node_id, None)
        self.identities[node_id] = identity
        if identity.client_id < 0:
            self._unassigned[node_id] = identity
            return None
        self._bind(identity.client_id, node_id)
        return None

    def check(self, identity: ClientIdentity) -> str | None:
        """Why a node answering ``identity`` would be refused (data kind, shapes, id range), or ``None``.

        A pooled simulation node (:mod:`fedmeta.flower.pool`) is checked this way without being
        registered as a client.
        """
        return self._check(identity)

    def _check(self, identity: ClientIdentity) -> str | None:
        if identity.kind != self.kind:
            return f"its tasks are {identity.kind}, the model is for {self.kind} tasks"
        if identity.client_id >= self.clients_total:
            return f"client id {identity.client_id} is outside 0..{self.clients_total - 1} (federation.clients_total)"
        if (
            self.input_shape is not None
            and identity.input_shape
            and tuple(identity.input_shape) != tuple(self.input_shape)
        ):
            return f"its inputs have shape {tuple(identity.input_shape)}, the model expects {tuple(self.input_shape)}"
        if self.output_dim is not None and identity.output_dim and identity.output_dim != self.output_dim:
            return f"its tasks need {identity.output_dim} outputs, the model has {self.output_dim}"
        return None

    def _bind(self, client_id: int, node_id: int) -> None:
        previous = self._client_of.get(node_id)
        if previous is not None and previous != client_id:  # the node now claims another id: release its old one
            log.info("node %s now acts as client %d instead of %d", node_id, client_id, previous)
            self._node_of.pop(previous, None)
        self._node_of[client_id] = node_id
        self._client_of[node_id] = client_id

    def assign_missing(self) -> list[tuple[int, int]]:
        """Give nodes without an id the free ids, in order of (site name, node id).

        Returns:
            ``(client_id, node_id)`` pairs assigned; nodes left over when ids run out stay idle.
        """
        free = (c for c in range(self.clients_total) if c not in self._node_of)
        done = []
        for node_id, ident in sorted(self._unassigned.items(), key=lambda kv: (kv[1].site, kv[0])):
            cid = next(free, None)
            if cid is None:
                log.warning("no free client id left for node %s (site %r)", node_id, ident.site)
                continue
            self._bind(cid, node_id)
            done.append((cid, node_id))
            del self._unassigned[node_id]
        return done

    def forget(self, node_ids: set[int]) -> None:
        """Drop nodes that left (their clients become unavailable until they answer again)."""
        for node_id in node_ids:
            cid = self._client_of.pop(node_id, None)
            if cid is not None and self._node_of.get(cid) == node_id:
                del self._node_of[cid]
            self._unassigned.pop(node_id, None)
            self.refused.pop(node_id, None)
            self.contested.pop(node_id, None)
            self.identities.pop(node_id, None)

    def locate(self, client_ids: Sequence[int]) -> tuple[dict[int, int], list[int]]:
        """Node of each client, and the clients with no node (unavailable)."""
        found, missing = {}, []
        for cid in client_ids:
            node = self._node_of.get(int(cid))
            if node is None:
                missing.append(int(cid))
            else:
                found[int(cid)] = node
        return found, missing

    def client_of(self, node_id: int) -> int | None:
        """The client id a node acts as."""
        return self._client_of.get(node_id)


def needs_site_layout(cfg: Config) -> bool:
    """True when the server holds no site data and must learn the data's shapes from the sites.

    That is a deployment of on-disk sites (``task.name: folder``) whose server config leaves
    ``task.data_dir`` null: every SuperNode reads its own ``data-dir``, and the model's input
    shape, output size and task kind come from the sites' answers to the start-up query.
    """
    return cfg.task.name == "folder" and not cfg.task.data_dir


class SiteLayoutFamily(TaskFamily):
    """The sites' data as their start-up answers describe it: kind and shapes, but no tasks.

    A server without site data builds its model from this family (the architecture comes from
    the config, the input shape and outputs from the sites); asking it for tasks is an error.
    """

    def __init__(self, kind: str, input_shape: Sequence[int], output_dim: int) -> None:
        self.kind = kind
        self.input_shape = tuple(int(d) for d in input_shape)
        self.output_dim = int(output_dim)

    def _no_tasks(self) -> ConfigError:
        return ConfigError(
            "this server holds no task data (task.name 'folder' with task.data_dir null): it evaluates through "
            "the sites (eval.clients > 0); for server-side evaluation point task.data_dir at a site folder with "
            "heldout/ tasks"
        )

    def sample_params(self, gen: torch.Generator, n: int, split: str) -> torch.Tensor:
        raise self._no_tasks()

    def make_tasks(self, params: torch.Tensor, gen: torch.Generator) -> TaskBatch:
        raise self._no_tasks()


def site_layout(identities: Sequence[ClientIdentity]) -> SiteLayoutFamily:
    """The data layout (kind, input shape, outputs) that most sites report.

    Ties go to the layout of the lowest client id (then site name), so the choice does not depend
    on the order of the answers. Sites with another layout are refused afterwards by the
    :class:`ClientDirectory` built for the resulting model.

    Raises:
        InconsistentReplies: if no site described its data.
    """
    from fedmeta.errors import InconsistentReplies

    described = [i for i in identities if i.input_shape and i.output_dim > 0]
    if not described:
        raise InconsistentReplies(
            "no site described its data in the start-up query, so the server cannot build the model "
            "(task.data_dir is null on the server: the model's shapes come from the sites)"
        )
    votes: dict[tuple[str, tuple[int, ...], int], list[tuple[int, str]]] = {}
    for ident in described:
        key = (ident.kind, tuple(ident.input_shape), int(ident.output_dim))
        rank = ident.client_id if ident.client_id >= 0 else 1 << 62
        votes.setdefault(key, []).append((rank, ident.site))
    # most sites first; among equals, the layout of the lowest (client id, site name)
    (kind, shape, outputs), _ = min(votes.items(), key=lambda kv: (-len(kv[1]), min(kv[1])))
    if len(votes) > 1:
        log.warning(
            "sites report %d different data layouts; the model follows the most common one: %s %s -> %d",
            len(votes),
            kind,
            shape,
            outputs,
        )
    return SiteLayoutFamily(kind, shape, outputs)
