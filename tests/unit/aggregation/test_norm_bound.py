"""fedmeta.aggregation.norm_bound: every update clipped to the bound, then the weighted mean."""

from __future__ import annotations

import pytest
import torch

from fedmeta.aggregation import AGGREGATORS, NormBoundedMean, build_aggregator
from fedmeta.config import config_from_dict
from fedmeta.errors import ConfigError


def test_a_fixed_bound_clips_only_the_large_updates() -> None:
    u = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4], [300.0, 400.0]]), "b": torch.zeros(3)}
    out = NormBoundedMean(1.0).aggregate(u, torch.tensor([1.0, 1.0, 2.0]))
    expected = (torch.tensor([0.6, 0.8]) + torch.tensor([0.3, 0.4]) + 2 * torch.tensor([0.6, 0.8])) / 4
    torch.testing.assert_close(out["w"], expected)


def test_null_bound_is_the_median_norm_so_one_client_moves_the_mean_little() -> None:
    honest = [torch.tensor([1.0, 0.0])] * 4
    u = {"w": torch.stack([*honest, torch.tensor([-1e6, 0.0])])}
    out = NormBoundedMean().aggregate(u, torch.ones(5))["w"]
    torch.testing.assert_close(out, torch.tensor([0.6, 0.0]))  # the attacker counts with norm 1


def test_built_from_config_and_bound_checked() -> None:
    rule = build_aggregator(config_from_dict({"federation": {"aggregation": "norm_bound", "norm_bound": 2.5}}))
    assert isinstance(rule, NormBoundedMean) and rule.bound == 2.5 and AGGREGATORS.get("norm_bound") is NormBoundedMean
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ConfigError, match="'federation.norm_bound' must be null"):
            config_from_dict({"federation": {"norm_bound": bad}})
