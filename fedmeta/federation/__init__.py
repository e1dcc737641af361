"""Federated meta-learning rounds, with no Flower import.

* :mod:`~fedmeta.federation.loop`: :class:`RoundLoop`, the one round loop of every path (sample,
  transport, validate, aggregate, optimizer, account, evaluate, checkpoint, log).
* :mod:`~fedmeta.federation.transport`: the :class:`Transport` interface and the in-process
  transport of the centralized reference (the Flower transport is in :mod:`fedmeta.flower`).
* :mod:`~fedmeta.federation.client`: what a client computes (identity, train reply, evaluation).
* :mod:`~fedmeta.federation.directory`: which node hosts which client; the sites' data layout.
* :mod:`~fedmeta.federation.faults`: hostile clients on any transport (fault injection for
  robustness benchmarks and tests).
"""

from __future__ import annotations

from fedmeta.federation.client import (
    COMPUTE_SECONDS,
    ClientIdentity,
    check_received_meta,
    combine_eval_metrics,
    describe_client,
    eval_cohort,
    evaluate_on_client,
    resolve_client_id,
    train_cohort,
    train_on_client,
)
from fedmeta.federation.directory import ClientDirectory, SiteLayoutFamily, needs_site_layout, site_layout
from fedmeta.federation.faults import FAULTS, HostileClients, make_fault
from fedmeta.federation.loop import (
    AggregateTransform,
    ClientReply,
    PlainPolicy,
    ProgressFn,
    RoundLog,
    RoundLoop,
    RoundPolicy,
    UpdateTransform,
    default_policy,
)
from fedmeta.federation.transport import InProcessTransport, Transport

__all__ = [
    "COMPUTE_SECONDS",
    "ClientIdentity",
    "check_received_meta",
    "combine_eval_metrics",
    "describe_client",
    "eval_cohort",
    "evaluate_on_client",
    "resolve_client_id",
    "train_cohort",
    "train_on_client",
    "ClientDirectory",
    "SiteLayoutFamily",
    "needs_site_layout",
    "site_layout",
    "FAULTS",
    "HostileClients",
    "make_fault",
    "AggregateTransform",
    "ClientReply",
    "PlainPolicy",
    "ProgressFn",
    "RoundLog",
    "RoundLoop",
    "RoundPolicy",
    "UpdateTransform",
    "default_policy",
    "InProcessTransport",
    "Transport",
]
