"""fedmeta.aggregation.krum: Krum's scores against a hand computation, selection, multi-Krum and options."""

from __future__ import annotations

import pytest
import torch

from fedmeta.aggregation import AGGREGATORS, Krum, MultiKrum, aggregate, build_aggregator
from fedmeta.aggregation.krum import krum_scores
from fedmeta.config import config_from_dict
from fedmeta.errors import ConfigError


def _cohort() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    honest = 1.0 + 0.1 * torch.randn(8, 3, generator=g)
    hostile = torch.tensor([[-50.0, 40.0, 30.0], [60.0, -70.0, 10.0]])
    return {"w": torch.cat([honest, hostile])}


def test_scores_are_the_sums_of_squared_distances_to_the_nearest_n_minus_f_minus_2() -> None:
    u = _cohort()
    flat = u["w"].double()
    n, f = 10, 2
    for i in range(n):
        d = sorted(float((flat[i] - flat[j]).pow(2).sum()) for j in range(n) if j != i)
        assert float(krum_scores(u, f)[i]) == pytest.approx(sum(d[: n - f - 2]), rel=1e-12)


def test_krum_picks_an_honest_update_and_multikrum_averages_the_honest_ones() -> None:
    u = _cohort()
    out = Krum(2).aggregate(u, torch.ones(10))["w"]
    assert any(torch.equal(out, u["w"][i]) for i in range(8))
    multi = MultiKrum(2).aggregate(u, torch.ones(10))["w"]  # m = n - f = 8: exactly the honest ones
    torch.testing.assert_close(multi, u["w"][:8].mean(0))
    weighted = MultiKrum(2, 8).aggregate(u, torch.arange(1.0, 11.0))["w"]
    w = torch.arange(1.0, 9.0)
    torch.testing.assert_close(weighted, (w[:, None] * u["w"][:8]).sum(0) / w.sum())
    assert float(aggregate(u, torch.ones(10))["w"].abs().max()) > 1  # the mean is pulled away


def test_small_cohorts_degrade_to_one_neighbour() -> None:
    one = {"w": torch.tensor([[3.0]])}
    assert torch.equal(Krum(1).aggregate(one, torch.ones(1))["w"], torch.tensor([3.0]))
    three = {"w": torch.tensor([[0.0], [0.1], [9.0]])}  # n = 3 < 2f + 3 for f = 1
    assert float(Krum(1).aggregate(three, torch.ones(3))["w"]) in (0.0, pytest.approx(0.1))


def test_built_from_config_and_options_checked() -> None:
    cfg = config_from_dict(
        {"federation": {"aggregation": "multikrum", "clients_per_round": 10, "krum_f": 3, "multikrum_m": 5}}
    )
    rule = build_aggregator(cfg)
    assert isinstance(rule, MultiKrum) and (rule.f, rule.m) == (3, 5) and AGGREGATORS.get("krum") is Krum
    with pytest.raises(ConfigError, match=r"'federation.krum_f' must satisfy federation.clients_per_round \(10\)"):
        config_from_dict({"federation": {"aggregation": "krum", "clients_per_round": 10, "krum_f": 4}})
    with pytest.raises(ConfigError, match="'federation.krum_f' must be a non-negative integer"):
        config_from_dict({"federation": {"krum_f": -1}})
    with pytest.raises(ConfigError, match="'federation.multikrum_m' must be null or between 1 and"):
        config_from_dict({"federation": {"aggregation": "multikrum", "clients_per_round": 10, "multikrum_m": 11}})
