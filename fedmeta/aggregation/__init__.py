"""Validating and combining client meta-updates: the weighted mean and robust alternatives.

One rule per module (:mod:`.mean`, :mod:`.median`, :mod:`.trimmed_mean`, :mod:`.weighted_median`,
:mod:`.weighted_trimmed_mean`, :mod:`.krum` (Krum and multi-Krum), :mod:`.norm_bound`) behind the
:class:`~fedmeta.aggregation.base.Aggregator` interface, registered in :data:`AGGREGATORS` under
``federation.aggregation``; :mod:`.updates` checks and stacks the updates a rule combines.
"""

from fedmeta.aggregation.base import AGGREGATORS, Aggregator, aggregate, build_aggregator

# Each rule module registers itself on import; this order is the order messages list the names.
# isort: off
from fedmeta.aggregation.mean import WeightedMean
from fedmeta.aggregation.median import CoordinateMedian
from fedmeta.aggregation.trimmed_mean import TrimmedMean
from fedmeta.aggregation.weighted_median import WeightedMedian
from fedmeta.aggregation.weighted_trimmed_mean import WeightedTrimmedMean
from fedmeta.aggregation.krum import Krum, MultiKrum
from fedmeta.aggregation.norm_bound import NormBoundedMean

# isort: on
from fedmeta.aggregation.updates import global_norm, stack, validate_update

__all__ = [
    "Aggregator",
    "AGGREGATORS",
    "build_aggregator",
    "aggregate",
    "WeightedMean",
    "CoordinateMedian",
    "TrimmedMean",
    "WeightedMedian",
    "WeightedTrimmedMean",
    "Krum",
    "MultiKrum",
    "NormBoundedMean",
    "validate_update",
    "stack",
    "global_norm",
]
