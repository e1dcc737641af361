"""fedmeta: federated meta-learning.

The library core: task families (:mod:`fedmeta.tasks`), models (:mod:`fedmeta.models`),
meta-learning algorithms (:mod:`fedmeta.algorithms`), aggregation, the server optimizer,
evaluation, checkpoints and the centralized reference loop. Flower appears only in
:mod:`fedmeta.flower` and in the ``client``/``server`` apps.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
