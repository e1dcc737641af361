"""Privacy mechanisms: one class per ``privacy.mode``, registered in :data:`MECHANISMS`.

========================  ========  ==============  =============================================
mode                      unit      noise added by  module
========================  ========  ==============  =============================================
``none``                  none      nobody          :mod:`~fedmeta.privacy.mechanisms.none`
``client-central``        client    server          :mod:`~fedmeta.privacy.mechanisms.client_central`
``client-local``          client    client          :mod:`~fedmeta.privacy.mechanisms.client_local`
``task``                  task      site            :mod:`~fedmeta.privacy.mechanisms.task`
``client-distributed``    client    clients         :mod:`~fedmeta.privacy.mechanisms.client_distributed`
========================  ========  ==============  =============================================

The interface is :class:`~fedmeta.privacy.mechanisms.base.PrivacyMechanism`; :func:`mechanism_for`
gives the mechanism of a config. Registration order is the order of the modes in messages.
"""

from __future__ import annotations

from fedmeta.privacy.mechanisms.base import (
    CLIP_BIT_KEY,
    CLIP_NORM_KEY,
    MECHANISMS,
    NOISE_ADDERS,
    UNITS,
    ClientSetup,
    PrivacyMechanism,
    RoundRelease,
    TrainInstruction,
    declarations_table,
    mechanism_for,
)

# registration order is the order of the modes in messages ("known: none, client-central, ..."):
# keep these imports in it
from fedmeta.privacy.mechanisms.none import NoPrivacy  # isort: skip
from fedmeta.privacy.mechanisms.client_central import ClientCentralPrivacy  # isort: skip
from fedmeta.privacy.mechanisms.client_local import ClientLocalPrivacy  # isort: skip
from fedmeta.privacy.mechanisms.task import TaskPrivacy  # isort: skip
from fedmeta.privacy.mechanisms.client_distributed import ClientDistributedPrivacy  # isort: skip

__all__ = [
    "CLIP_BIT_KEY",
    "CLIP_NORM_KEY",
    "MECHANISMS",
    "NOISE_ADDERS",
    "UNITS",
    "ClientSetup",
    "TrainInstruction",
    "RoundRelease",
    "ClientCentralPrivacy",
    "ClientDistributedPrivacy",
    "ClientLocalPrivacy",
    "NoPrivacy",
    "PrivacyMechanism",
    "TaskPrivacy",
    "declarations_table",
    "mechanism_for",
]
