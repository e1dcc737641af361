"""Meta-learning algorithms behind one signature, and the registry that maps config names to them."""

from __future__ import annotations

from fedmeta.algorithms.anil import ANIL
from fedmeta.algorithms.base import METRIC_NAMES, MetaAlgorithm, MetaUpdate, task_accuracy, task_loss
from fedmeta.algorithms.fedavg import FedAvg
from fedmeta.algorithms.fomaml import FOMAML
from fedmeta.algorithms.maml import MAML
from fedmeta.algorithms.metasgd import MetaSGD
from fedmeta.algorithms.reptile import Reptile
from fedmeta.errors import ConfigError
from fedmeta.models.base import FunctionalModel

__all__ = [
    "MetaAlgorithm",
    "MetaUpdate",
    "MAML",
    "FOMAML",
    "Reptile",
    "MetaSGD",
    "ANIL",
    "FedAvg",
    "ALGORITHMS",
    "build_algorithm",
    "task_loss",
    "task_accuracy",
    "METRIC_NAMES",
]

ALGORITHMS: dict[str, type[MetaAlgorithm]] = {
    cls.name: cls for cls in (MAML, FOMAML, Reptile, MetaSGD, ANIL, FedAvg)
}


def build_algorithm(
    name: str, model: FunctionalModel, *, kind: str, inner_lr: float, inner_steps: int, head_init: str = "learned"
) -> MetaAlgorithm:
    """Instantiate the algorithm registered under ``name``.

    ``head_init`` (``meta.head_init``) is where ANIL's head adaptation starts; other algorithms
    take only ``learned``.

    Raises:
        ConfigError: for a name that is not registered (the message lists the known ones), or a
            ``head_init`` the algorithm or task kind cannot use.
    """
    try:
        cls = ALGORITHMS[name]
    except KeyError:
        raise ConfigError(
            f"config key 'meta.algorithm' has no algorithm {name!r} (known: {', '.join(ALGORITHMS)})"
        ) from None
    if cls is ANIL:
        if head_init == "prototypes" and kind != "classification":
            raise ConfigError(f"config key 'meta.head_init' is 'prototypes', which needs classification tasks; these are {kind}")
        return ANIL(model, kind=kind, inner_lr=inner_lr, inner_steps=inner_steps, head_init=head_init)
    if head_init != "learned":
        raise ConfigError(f"config key 'meta.head_init' is {head_init!r}, which only meta.algorithm 'anil' takes ({name!r} adapts the whole model)")
    return cls(model, kind=kind, inner_lr=inner_lr, inner_steps=inner_steps)
