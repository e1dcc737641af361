"""fedmeta: federated meta-learning.

The library core: task families (:mod:`fedmeta.tasks`), models (:mod:`fedmeta.models`),
meta-learning algorithms (:mod:`fedmeta.algorithms`), aggregation, the server optimizer,
evaluation, checkpoints and the centralized reference loop. Flower appears only in
:mod:`fedmeta.flower` (records, apps, strategy, simulation, deployment); the ``client``/``server``
folders hold the shims ``flwr run`` loads, and the library never imports them. The command line
is :mod:`fedmeta.cli`.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["__version__"]
