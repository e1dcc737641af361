"""fedmeta.aggregation.weighted_trimmed_mean: trimming a share of the weight, against a hand computation."""

from __future__ import annotations

import pytest
import torch

from fedmeta.aggregation import AGGREGATORS, TrimmedMean, WeightedTrimmedMean, build_aggregator
from fedmeta.config import config_from_dict
from fedmeta.errors import ConfigError


def test_equal_weights_with_a_whole_number_trimmed_give_trimmed_mean() -> None:
    g = torch.Generator().manual_seed(3)
    u = {"w": torch.randn(10, 6, generator=g)}
    torch.testing.assert_close(
        WeightedTrimmedMean(0.2).aggregate(u, torch.ones(10))["w"], TrimmedMean(0.2).aggregate(u, torch.ones(10))["w"]
    )


def test_boundary_clients_count_in_part() -> None:
    # values 0, 1, 2, 3, 100 with weights 1, 1, 1, 1, 2 (total 6); trimming 0.25 removes 1.5 at each end:
    # the lower end drops 0 and half of 1; the upper end drops 1.5 of the value 100 (weight 2)
    u = {"w": torch.tensor([[100.0], [0.0], [2.0], [1.0], [3.0]])}
    w = torch.tensor([2.0, 1.0, 1.0, 1.0, 1.0])
    expected = (0.5 * 1 + 1 * 2 + 1 * 3 + 0.5 * 100) / 3.0
    torch.testing.assert_close(WeightedTrimmedMean(0.25).aggregate(u, w)["w"], torch.tensor([expected]))
    torch.testing.assert_close(WeightedTrimmedMean(0.0).aggregate(u, w)["w"], (w[:, None] * u["w"]).sum(0) / 6)


def test_registered_and_shares_trimmed_means_option() -> None:
    assert AGGREGATORS.get("weighted_trimmed_mean") is WeightedTrimmedMean
    cfg = config_from_dict({"federation": {"aggregation": "weighted_trimmed_mean", "trim_fraction": 0.3}})
    rule = build_aggregator(cfg)
    assert isinstance(rule, WeightedTrimmedMean) and rule.trim_fraction == 0.3
    with pytest.raises(ConfigError, match="'federation.trim_fraction' must be in"):
        WeightedTrimmedMean(0.5)
