"""Domain errors. The CLI turns each into a one-paragraph message and a non-zero exit status."""

from __future__ import annotations

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
    """Base class of every error fedmeta raises on purpose."""

    exit_code = 1


class ConfigError(FedMetaError, ValueError):
    """A configuration file, key or value is invalid. The message names the key and the value."""

    exit_code = 2


class DataFormatError(FedMetaError, ValueError):
    """A data folder or file does not match the documented on-disk format. Names the file."""

    exit_code = 3


class CheckpointError(FedMetaError, ValueError):
    """A checkpoint is missing, corrupt, or incompatible with the model or task family."""

    exit_code = 4


class BudgetExhausted(FedMetaError):
    """The configured privacy budget would be exceeded."""

    exit_code = 5


class InconsistentReplies(FedMetaError):
    """Too few valid client replies arrived to complete a round."""

    exit_code = 6


class UpdateRejected(FedMetaError, ValueError):
    """A client update has the wrong keys or shapes, or non-finite values."""

    exit_code = 7


class DeploymentError(FedMetaError):
    """A deployment process (SuperLink, SuperNode, ``flwr run``) failed or timed out."""

    exit_code = 8


class PrivacyFloorViolated(FedMetaError):
    """A run asks a site for less privacy than the floor the site pinned in its node config."""

    exit_code = 9
