"""Models, kept apart from the algorithms that adapt them. :func:`build_model` is the registry."""

from __future__ import annotations

from fedmeta.config import Config
from fedmeta.errors import ConfigError
from fedmeta.models.base import FunctionalModel
from fedmeta.models.mlp import MLP

__all__ = ["FunctionalModel", "MLP", "build_model", "MODEL_REGISTRY"]


def _mlp(cfg: Config, input_shape: tuple[int, ...], outputs: int) -> FunctionalModel:
    return MLP(input_shape, cfg.model.hidden, outputs)


def _conv4(cfg: Config, input_shape: tuple[int, ...], outputs: int) -> FunctionalModel:
    from fedmeta.models.conv4 import Conv4

    return Conv4.from_config(cfg, input_shape, outputs)


MODEL_REGISTRY = {"mlp": _mlp, "conv4": _conv4}


def build_model(cfg: Config, input_shape: tuple[int, ...], outputs: int) -> FunctionalModel:
    """Build the model named by ``cfg.model.name`` for the given input shape and outputs.

    Raises:
        ConfigError: for an unknown model name.
    """
    try:
        factory = MODEL_REGISTRY[cfg.model.name]
    except KeyError:
        raise ConfigError(
            f"config key 'model.name' has no model {cfg.model.name!r} (known: {', '.join(MODEL_REGISTRY)})"
        ) from None
    return factory(cfg, input_shape, outputs)
