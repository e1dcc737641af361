"""fedmeta.aggregation.weighted_median: the weighted median, and equal weights giving ``median``."""

from __future__ import annotations

import pytest
import torch

from fedmeta.aggregation import AGGREGATORS, CoordinateMedian, WeightedMedian, aggregate


def test_heavy_clients_move_the_median() -> None:
    u = {"w": torch.tensor([[1.0, 9.0], [5.0, -3.0], [2.0, 4.0]])}
    out = WeightedMedian().aggregate(u, torch.tensor([100.0, 1.0, 1.0]))
    torch.testing.assert_close(out["w"], torch.tensor([1.0, 9.0]))  # one client holds most weight
    assert AGGREGATORS.get("weighted_median") is WeightedMedian


def test_a_zero_weight_value_is_skipped_and_an_exact_half_averages() -> None:
    u = {"w": torch.tensor([[0.0], [100.0], [2.0]])}
    torch.testing.assert_close(WeightedMedian().aggregate(u, torch.tensor([1.0, 0.0, 1.0]))["w"], torch.tensor([1.0]))


@pytest.mark.parametrize("n", [1, 2, 5, 6, 9])
def test_equal_weights_give_the_coordinate_median(n: int) -> None:
    g = torch.Generator().manual_seed(n)
    u = {"w": torch.randn(n, 4, 3, generator=g), "b": torch.randn(n, generator=g)}
    a = CoordinateMedian().aggregate(u, torch.ones(n))
    b = WeightedMedian().aggregate(u, torch.full((n,), 0.1))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    torch.testing.assert_close(aggregate(u, torch.ones(n), method="weighted_median")["b"], a["b"])


def test_negative_or_zero_weights_are_refused() -> None:
    u = {"w": torch.ones(2, 1)}
    with pytest.raises(ValueError, match="non-negative"):
        WeightedMedian().aggregate(u, torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="sum to zero"):
        WeightedMedian().aggregate(u, torch.zeros(2))
