"""fedmeta.aggregation.trimmed_mean: how many values are dropped, and its option's validation."""

from __future__ import annotations

import pytest
import torch

from fedmeta.aggregation import AGGREGATORS, TrimmedMean, aggregate, build_aggregator
from fedmeta.aggregation.trimmed_mean import trim_count
from fedmeta.config import config_from_dict
from fedmeta.errors import ConfigError


def test_registered_as_trimmed_mean_and_reads_its_option() -> None:
    assert AGGREGATORS.get("trimmed_mean") is TrimmedMean
    rule = build_aggregator(config_from_dict({"federation": {"aggregation": "trimmed_mean", "trim_fraction": 0.2}}))
    assert isinstance(rule, TrimmedMean) and rule.trim_fraction == 0.2


def test_drops_floor_of_trim_fraction_times_cohort_at_each_end() -> None:
    values = torch.tensor([-100.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 100.0])  # C = 10
    updates = {"w": values[torch.randperm(10, generator=torch.Generator().manual_seed(0))].unsqueeze(1)}
    torch.testing.assert_close(TrimmedMean(0.1).aggregate(updates, torch.ones(10))["w"], torch.tensor([4.5]))
    # 0.25: two dropped at each end
    torch.testing.assert_close(TrimmedMean(0.25).aggregate(updates, torch.ones(10))["w"], torch.tensor([4.5]))
    torch.testing.assert_close(TrimmedMean(0.0).aggregate(updates, torch.ones(10))["w"], values.mean().view(1))


def test_small_cohort_still_trims_one_value_at_each_end() -> None:
    # issue 15, finding 7: floor(0.1 * 9) = 0 made the rule the plain mean, so one client set it
    updates = {"w": torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0], [6.0], [7.0], [8.0], [1e6]])}
    out = TrimmedMean(0.1).aggregate(updates, torch.arange(1.0, 10.0))
    torch.testing.assert_close(out["w"], torch.tensor([5.0]))  # mean of 2..8
    three = {"w": torch.tensor([[1.0], [-1e6], [2.0]])}
    torch.testing.assert_close(TrimmedMean(0.1).aggregate(three, torch.ones(3))["w"], torch.tensor([1.0]))


@pytest.mark.parametrize(
    ("fraction", "cohort", "cut"),
    [(0.1, 9, 1), (0.1, 10, 1), (0.1, 25, 2), (0.25, 10, 2), (0.0, 9, 0), (0.1, 2, 0), (0.1, 3, 1), (0.49, 10, 4)],
)
def test_trim_count(fraction: float, cohort: int, cut: int) -> None:
    assert trim_count(fraction, cohort) == cut


def test_matches_the_functional_form() -> None:
    g = torch.Generator().manual_seed(1)
    updates = {"w": torch.randn(12, 4, generator=g)}
    a = TrimmedMean(0.2).aggregate(updates, torch.ones(12))
    b = aggregate(updates, torch.ones(12), method="trimmed_mean", trim_fraction=0.2)
    assert torch.equal(a["w"], b["w"])


@pytest.mark.parametrize("fraction", [-0.1, 0.5, 0.7])
def test_trim_fraction_out_of_range_names_the_key(fraction: float) -> None:
    match = rf"config key 'federation.trim_fraction' must be in \[0, 0.5\), got {fraction}"
    with pytest.raises(ConfigError, match=match):
        TrimmedMean(fraction)
    for rule in ("trimmed_mean", "mean"):  # the option is checked whichever rule is selected
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"federation": {"aggregation": rule, "trim_fraction": fraction}})
