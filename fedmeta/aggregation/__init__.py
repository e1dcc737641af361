"""Validating and combining client meta-updates (the module's contents are in :mod:`.updates`)."""

from fedmeta.aggregation.updates import AGGREGATORS, aggregate, global_norm, stack, validate_update

__all__ = ["validate_update", "aggregate", "stack", "AGGREGATORS", "global_norm"]
