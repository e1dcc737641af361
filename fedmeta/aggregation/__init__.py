"""Validating and combining client meta-updates: the weighted mean and robust alternatives.

One rule per module (:mod:`.mean`, :mod:`.median`, :mod:`.trimmed_mean`) behind the
:class:`~fedmeta.aggregation.base.Aggregator` interface, registered in :data:`AGGREGATORS` under
``federation.aggregation``; :mod:`.updates` checks and stacks the updates a rule combines.
"""

from fedmeta.aggregation.base import AGGREGATORS, Aggregator, aggregate, build_aggregator

# Each rule module registers itself on import; this order is the order messages list the names.
from fedmeta.aggregation.mean import WeightedMean
from fedmeta.aggregation.median import CoordinateMedian
from fedmeta.aggregation.trimmed_mean import TrimmedMean
from fedmeta.aggregation.updates import global_norm, stack, validate_update

__all__ = [
    "Aggregator",
    "AGGREGATORS",
    "build_aggregator",
    "aggregate",
    "WeightedMean",
    "CoordinateMedian",
    "TrimmedMean",
    "validate_update",
    "stack",
    "global_norm",
]
