"""Which background classes a federated client holds: non-IID partitions of the glyphs.

In FEMNIST every writer is a client with their own hand; here a client is one of

* ``iid``: every client draws from all background classes (the IID baseline);
* ``style``: client ``c`` is font face ``c mod 12`` — it holds the background characters that
  face renders, and all its drawings are in that face (its own "hand");
* ``script``: client ``c`` is background alphabet ``c mod A`` (alphabets with at least ``ways``
  characters, sorted by name) — the strongest label skew;
* ``dirichlet``: client ``c`` draws alphabet preferences ``pi_c ~ Dir(alpha)`` and then a slice of
  ``max(2 * ways, ceil(B / clients_total))`` background characters without replacement, each
  with probability proportional to ``pi_c`` of its alphabet (shared out over the alphabet's
  characters). Small ``alpha`` concentrates a client on one or two alphabets; large ``alpha``
  approaches ``iid``. Slices of different clients may overlap, as FEMNIST writers share classes.

Every rule is a function of ``(seed, client_id, clients_total)`` alone, so a client's partition is
computed without looking at any other client's, for any number of clients. No rule ever gives a
client a class of an evaluation alphabet.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from fedmeta.errors import ConfigError
from fedmeta.rng import derive_seed
from fedmeta.tasks.glyphs.catalog import ClassCatalog
from fedmeta.tasks.glyphs.render import STYLES

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = [
    "client_classes","PARTITIONS", "client_partition"]

PARTITIONS = ("iid", "style", "script", "dirichlet")


def client_partition(
    catalog: ClassCatalog,
    scheme: str,
    *,
    client_id: int,
    clients_total: int,
    ways: int,
    alpha: float,
    seed: int,
) -> tuple[np.ndarray, int | None]:
    """The background classes of one client, and its font face (``style`` scheme) or ``None``.

    Args:
        catalog: the character table (the glyph list, or Omniglot's alphabets).
        scheme: one of :data:`PARTITIONS`.
        client_id: the client, ``0 <= client_id < clients_total``.
        clients_total: number of registered clients.
        ways: classes per episode (a client needs at least this many).
        alpha: Dirichlet concentration (``dirichlet`` only).
        seed: the run's seed.

    Returns:
        ``(classes, style)``: sorted catalog indices and the face index (or ``None``: mixed faces).

    Raises:
        ConfigError: for an unknown scheme, a client id out of range, or a partition too small
            for ``ways``-way episodes.
    """
    if not 0 <= client_id < clients_total:
        raise ConfigError(f"client id {client_id} is outside federation.clients_total ({clients_total})")
    background = catalog.split_classes("train")
    style: int | None = None
    if scheme == "iid":
        classes = background
    elif scheme == "style":
        style = client_id % len(STYLES)
        classes = background[(catalog.style_mask[background] >> style) & 1 == 1]
    elif scheme == "script":
        counts = {a: int(np.sum(catalog.alphabet[background] == a)) for a in catalog.alphabets("train")}
        usable = sorted((a for a, n in counts.items() if n >= ways), key=lambda a: catalog.alphabet_names[a])
        if not usable:
            raise ConfigError(f"config key 'task.ways' is {ways}: no background alphabet has that many characters")
        chosen = usable[client_id % len(usable)]
        classes = background[catalog.alphabet[background] == chosen]
    elif scheme == "dirichlet":
        classes = _dirichlet_slice(
            catalog, background, client_id=client_id, clients_total=clients_total, ways=ways, alpha=alpha, seed=seed
        )
    else:
        raise ConfigError(f"config key 'task.partition' must be one of {', '.join(PARTITIONS)}, got {scheme!r}")
    if classes.shape[0] < ways:
        raise ConfigError(
            f"config key 'task.partition' ('{scheme}') gives client {client_id} only {classes.shape[0]} "
            f"background characters, fewer than task.ways ({ways})"
        )
    return np.sort(classes), style


def _dirichlet_slice(
    catalog: ClassCatalog,
    background: np.ndarray,
    *,
    client_id: int,
    clients_total: int,
    ways: int,
    alpha: float,
    seed: int,
) -> np.ndarray:
    alphabets = catalog.alphabets("train")
    # numpy's Generator has a Dirichlet sampler; it is seeded from (seed, client), never global
    rng = np.random.default_rng(derive_seed(seed, "glyph-partition", client_id))
    preference = rng.dirichlet(np.full(len(alphabets), float(alpha)))
    position = {a: i for i, a in enumerate(alphabets)}
    of_class = np.array([position[int(a)] for a in catalog.alphabet[background]])
    sizes = np.bincount(of_class, minlength=len(alphabets))
    weights = preference[of_class] / sizes[of_class]
    # a floor keeps every class reachable when pi_c underflows to exact zeros (tiny alpha)
    weights = weights + 1e-12 * weights.max()
    size = min(background.shape[0], max(2 * ways, math.ceil(background.shape[0] / clients_total)))
    picked = rng.choice(background.shape[0], size=size, replace=False, p=weights / weights.sum())
    return background[picked]


def client_classes(cfg: Config, catalog: ClassCatalog, client_id: int | None) -> tuple[np.ndarray, int | None]:
    """The background classes a family for ``client_id`` trains on (all of them for ``None``), and its face.

    :func:`client_partition` with the config's ``task.partition``, ``task.ways``,
    ``task.dirichlet_alpha``, ``federation.clients_total`` and ``seed``.
    """
    if client_id is None:
        return catalog.split_classes("train"), None
    t = cfg.task
    return client_partition(
        catalog,
        t.partition,
        client_id=client_id,
        clients_total=cfg.federation.clients_total,
        ways=t.ways,
        alpha=t.dirichlet_alpha,
        seed=cfg.seed,
    )
