"""Meta-learning algorithms behind one signature, and the registry that maps config names to them.

Each algorithm module registers its class in :data:`ALGORITHMS` (``@ALGORITHMS.register("maml")``)
and owns its option rules (:meth:`MetaAlgorithm.check_options`); importing this package imports
every module, so the registry is complete. A new algorithm is one module, its import below and
its test (ProtoNets, :mod:`fedmeta.algorithms.protonet`, is the worked example).
"""

from __future__ import annotations

from fedmeta.algorithms.base import ALGORITHMS, METRIC_NAMES, MetaAlgorithm, MetaUpdate, task_accuracy, task_loss

# isort: off
# imported in this order, which is the order of the registry's names (messages list them)
from fedmeta.algorithms.maml import MAML
from fedmeta.algorithms.fomaml import FOMAML
from fedmeta.algorithms.reptile import Reptile
from fedmeta.algorithms.metasgd import MetaSGD
from fedmeta.algorithms.anil import ANIL
from fedmeta.algorithms.fedavg import FedAvg
from fedmeta.algorithms.protonet import ProtoNet

# objective terms register in fedmeta.algorithms.engine.OBJECTIVE_TERMS
from fedmeta.algorithms.trlearner import TRLearner

# isort: on
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
    "ProtoNet",
    "TRLearner",
    "ALGORITHMS",
    "build_algorithm",
    "task_loss",
    "task_accuracy",
    "METRIC_NAMES",
]


def build_algorithm(
    name: str, model: FunctionalModel, *, kind: str, inner_lr: float, inner_steps: int, head_init: str = "learned"
) -> MetaAlgorithm:
    """Instantiate the algorithm registered under ``name``.

    ``head_init`` (``meta.head_init``) is where ANIL's head adaptation starts; other algorithms
    take only ``learned``. The options are checked by the algorithm's own
    :meth:`~MetaAlgorithm.check_options`, the rule config validation applies too.

    Raises:
        ConfigError: for a name that is not registered (the message lists the known ones), or
            options the algorithm or task kind cannot use.
    """
    return ALGORITHMS.get(name).build(model, kind=kind, inner_lr=inner_lr, inner_steps=inner_steps, head_init=head_init)
