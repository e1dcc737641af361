"""Update validation and aggregation rules."""

from __future__ import annotations

import pytest
import torch

from fedmeta.aggregation import aggregate, global_norm, stack, validate_update
from fedmeta.errors import UpdateRejected
from fedmeta.optim import ServerOptimizer


def _ref():
    return {"w": torch.zeros(3, 2), "b": torch.zeros(2)}


def test_validate_accepts_matching_update() -> None:
    validate_update({"w": torch.ones(3, 2), "b": torch.ones(2)}, _ref())


@pytest.mark.parametrize(
    ("update", "match"),
    [
        ({"w": torch.ones(3, 2)}, r"missing keys \['b'\]"),
        ({"w": torch.ones(3, 2), "b": torch.ones(2), "x": torch.ones(1)}, r"unexpected keys \['x'\]"),
        ({"w": torch.ones(2, 3), "b": torch.ones(2)}, r"'w' has shape \(2, 3\), expected \(3, 2\)"),
        ({"w": torch.ones(3, 2), "b": torch.tensor([1.0, float("nan")])}, r"'b' contains NaN or Inf"),
        ({"w": torch.full((3, 2), float("inf")), "b": torch.ones(2)}, r"'w' contains NaN or Inf"),
        ({"w": torch.ones(3, 2, dtype=torch.int64), "b": torch.ones(2)}, r"'w' has dtype"),
    ],
)
def test_validate_rejects_bad_updates(update, match: str) -> None:
    with pytest.raises(UpdateRejected, match=match):
        validate_update(update, _ref(), source="client 7")


def test_weighted_mean_weights_by_tasks() -> None:
    s = stack([{"w": torch.tensor([1.0])}, {"w": torch.tensor([4.0])}])
    out = aggregate(s, torch.tensor([3.0, 1.0]))
    torch.testing.assert_close(out["w"], torch.tensor([1.75]))


def test_robust_rules_bound_an_outlier() -> None:
    honest = [{"w": torch.tensor([1.0 + 0.01 * i])} for i in range(9)]
    attacker = {"w": torch.tensor([1e6])}
    s = stack([*honest, attacker])
    w = torch.ones(10)
    assert float(aggregate(s, w)["w"]) > 1e4
    assert float(aggregate(s, w, method="median")["w"]) == pytest.approx(1.045, abs=0.01)
    assert float(aggregate(s, w, method="trimmed_mean", trim_fraction=0.1)["w"]) == pytest.approx(1.045, abs=0.01)


def test_global_norm() -> None:
    assert global_norm({"a": torch.tensor([3.0]), "b": torch.tensor([4.0])}) == pytest.approx(5.0)


def test_server_sgd_step_and_state_round_trip() -> None:
    params = {"w": torch.tensor([1.0, 2.0])}
    opt = ServerOptimizer(params, name="sgd", lr=0.5)
    new = opt.step({"w": torch.tensor([1.0, -2.0])})
    torch.testing.assert_close(new["w"], torch.tensor([0.5, 3.0]))
    assert torch.equal(params["w"], torch.tensor([1.0, 2.0])), "the caller's dict must not change"
    adam = ServerOptimizer(params, name="adam", lr=0.1)
    adam.step({"w": torch.tensor([1.0, 1.0])})
    again = ServerOptimizer(adam.params, name="adam", lr=0.1)
    again.load_state_dict(adam.state_dict())
    torch.testing.assert_close(
        adam.step({"w": torch.tensor([0.3, -1.0])})["w"], again.step({"w": torch.tensor([0.3, -1.0])})["w"]
    )


ROBUST = ("median", "trimmed_mean", "weighted_median", "weighted_trimmed_mean", "krum", "multikrum", "norm_bound")


@pytest.mark.parametrize("rule", ROBUST)
def test_client_central_dp_refuses_robust_rules_naming_both_keys(rule: str) -> None:
    from fedmeta.config import config_from_dict
    from fedmeta.errors import ConfigError

    fed = {"aggregation": rule, "sampling": "poisson", "clients_per_round": 10}
    with pytest.raises(ConfigError, match="'federation.aggregation' must be 'mean' for privacy.mode 'client-central'"):
        config_from_dict({"federation": fed, "privacy": {"mode": "client-central"}})
    # post-processing of already private updates: the local and task-level modes take any rule
    for mode, task in (("client-local", {}), ("task", {"tasks_per_site": 40})):
        cfg = config_from_dict({"task": task, "federation": fed, "privacy": {"mode": mode}})
        assert cfg.federation.aggregation == rule
