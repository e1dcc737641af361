"""Models, kept apart from the algorithms that adapt them, registered in :data:`MODELS` by ``model.name``.

Each model class owns its name (``name``), how it is built from its ``model.*`` options
(``from_config``) and their validation (``check_config``); adding one is a module, its line below
and its test.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from fedmeta.models.base import FunctionalModel
from fedmeta.models.conv4 import Conv4
from fedmeta.models.mlp import MLP
from fedmeta.registry import Registry

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = ["FunctionalModel", "MLP", "Conv4", "build_model", "MODELS"]

#: The models by ``model.name``, in the order messages list them (the default first).
MODELS = Registry[type[FunctionalModel]]("model", key="model.name")
MODELS.add(MLP.name, MLP)
MODELS.add(Conv4.name, Conv4)


def build_model(cfg: Config, input_shape: tuple[int, ...], outputs: int) -> FunctionalModel:
    """Build the model named by ``cfg.model.name`` for the given input shape and outputs.

    Raises:
        ConfigError: for an unknown model name (naming ``model.name`` and the known names), or options
            that do not suit the task's inputs.
    """
    return MODELS.get(cfg.model.name).from_config(cfg, input_shape, outputs)
