"""fedmeta.aggregation.mean: the weighted mean against a float64 reference."""

from __future__ import annotations

import pytest
import torch

from fedmeta.aggregation import AGGREGATORS, WeightedMean, aggregate, build_aggregator
from fedmeta.config import config_from_dict


def _updates(c: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(c)
    return {"w": torch.randn(c, 3, 2, generator=g, dtype=dtype), "b": torch.randn(c, 2, generator=g, dtype=dtype)}


def test_registered_as_mean_and_built_from_config() -> None:
    assert AGGREGATORS.get("mean") is WeightedMean
    assert isinstance(build_aggregator(config_from_dict({"federation": {"aggregation": "mean"}})), WeightedMean)


def test_matches_a_float64_weighted_mean() -> None:
    updates, weights = _updates(5), torch.tensor([1.0, 2.0, 0.0, 3.0, 4.0])
    out = WeightedMean().aggregate(updates, weights)
    for k, v in updates.items():
        expected = (weights.double().view(-1, *[1] * (v.dim() - 1)) * v.double()).sum(0) / weights.double().sum()
        assert out[k].dtype == v.dtype and out[k].shape == v.shape[1:]
        torch.testing.assert_close(out[k].double(), expected, rtol=1e-6, atol=1e-7)


def test_only_relative_weights_matter_and_the_reference_is_not_used() -> None:
    updates, weights = _updates(4, torch.float64), torch.tensor([1.0, 2.0, 3.0, 4.0])
    rule = WeightedMean()
    a = rule.aggregate(updates, weights)
    b = rule.aggregate(updates, 10 * weights, reference={k: torch.ones(v.shape[1:]) for k, v in updates.items()})
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-15, atol=0.0)


def test_is_what_the_functional_form_computes() -> None:
    updates, weights = _updates(6), torch.arange(1.0, 7.0)
    a, b = WeightedMean().aggregate(updates, weights), aggregate(updates, weights, method="mean")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_weights_summing_to_zero_are_refused() -> None:
    with pytest.raises(ValueError, match="sum to zero"):
        WeightedMean().aggregate(_updates(3), torch.zeros(3))
