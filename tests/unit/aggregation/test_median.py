"""fedmeta.aggregation.median: the coordinate-wise median, odd and even cohorts."""

from __future__ import annotations

import torch

from fedmeta.aggregation import AGGREGATORS, CoordinateMedian, aggregate, build_aggregator
from fedmeta.config import config_from_dict


def test_registered_as_median_and_built_from_config() -> None:
    assert AGGREGATORS.get("median") is CoordinateMedian
    assert isinstance(build_aggregator(config_from_dict({"federation": {"aggregation": "median"}})), CoordinateMedian)


def test_odd_cohort_takes_the_middle_value_per_coordinate() -> None:
    updates = {"w": torch.tensor([[1.0, 9.0], [5.0, -3.0], [2.0, 4.0]])}
    out = CoordinateMedian().aggregate(updates, torch.tensor([100.0, 1.0, 1.0]))
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0]))


def test_even_cohort_averages_the_two_middle_values() -> None:
    updates = {"w": torch.tensor([[1.0], [2.0], [4.0], [1e6]])}
    torch.testing.assert_close(CoordinateMedian().aggregate(updates, torch.ones(4))["w"], torch.tensor([3.0]))


def test_weights_are_not_used_and_matches_the_functional_form() -> None:
    g = torch.Generator().manual_seed(0)
    updates = {"w": torch.randn(7, 3, generator=g), "b": torch.randn(7, generator=g)}
    a = CoordinateMedian().aggregate(updates, torch.ones(7))
    b = CoordinateMedian().aggregate(updates, torch.arange(1.0, 8.0))
    c = aggregate(updates, torch.ones(7), method="median")
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
