"""Domain errors. The CLI turns each into a one-paragraph message and a non-zero exit status."""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "FedMetaError",
    "ConfigError",
    "DataFormatError",
    "CheckpointError",
    "BudgetExhausted",
    "InconsistentReplies",
    "UpdateRejected",
    "DeploymentError",
    "PrivacyFloorViolated",
]


class FedMetaError(Exception):
    """Base class of every error fedmeta raises on purpose.

    Each kind of error declares the CLI's exit status for it in its class line
    (``class ConfigError(FedMetaError, ValueError, exit_code=2)``); a subclass that declares none
    keeps its parent's. No two kinds share a status, so a script can tell them apart.

    Raises:
        TypeError: when a class is defined with an exit status another kind already has.
    """

    #: the CLI's exit status for this error
    exit_code: ClassVar[int] = 1
    #: exit status -> the kind that has it
    _kinds: ClassVar[dict[int, str]] = {1: "FedMetaError"}

    def __init_subclass__(cls, *, exit_code: int | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if exit_code is None:
            return
        taken = FedMetaError._kinds.setdefault(exit_code, cls.__name__)
        if taken != cls.__name__:
            raise TypeError(f"exit status {exit_code} of {cls.__name__} is already {taken}'s")
        cls.exit_code = exit_code


class ConfigError(FedMetaError, ValueError, exit_code=2):
    """A configuration file, key or value is invalid. The message names the key and the value."""


class DataFormatError(FedMetaError, ValueError, exit_code=3):
    """A data folder or file does not match the documented on-disk format. Names the file."""


class CheckpointError(FedMetaError, ValueError, exit_code=4):
    """A checkpoint is missing, corrupt, or incompatible with the model or task family."""


class BudgetExhausted(FedMetaError, exit_code=5):
    """The configured privacy budget would be exceeded."""


class InconsistentReplies(FedMetaError, exit_code=6):
    """Too few valid client replies arrived to complete a round."""


class UpdateRejected(FedMetaError, ValueError, exit_code=7):
    """A client update has the wrong keys or shapes, or non-finite values."""


class DeploymentError(FedMetaError, exit_code=8):
    """A deployment process (SuperLink, SuperNode, ``flwr run``) failed or timed out."""


class PrivacyFloorViolated(FedMetaError, exit_code=9):
    """A run asks a site for less privacy than the floor the site pinned in its node config."""
