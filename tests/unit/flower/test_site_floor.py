"""A site's privacy floor in its node config (issue 15, finding 6; SPEC §4).

The run config comes from whoever submits the run; a site pins the least it accepts in its node
config and its ``ClientApp`` refuses weaker runs with an error reply (a failed client on the
server) and an error in its own log. Driven through Flower's ``Message`` / ``Context`` objects.
"""

from __future__ import annotations

import logging
from typing import Any

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.metadata import Metadata

from fedmeta.config import Config, config_from_dict
from fedmeta.errors import ConfigError
from fedmeta.experiment import Experiment
from fedmeta.flower import records as fl
from fedmeta.flower.client_app import build_client_app

FLOOR = {
    "privacy-mode": "client-local",
    "privacy-min-noise-multiplier": 1.0,
    "privacy-max-epsilon": 8.0,
    "privacy-max-delta": 1e-5,
    "privacy-max-clip-norm": 2.0,
}


def _cfg(**privacy: Any) -> Config:
    p = {"mode": "client-local", "noise_multiplier": 4.0, "target_epsilon": 6.0, "clip_norm": 1.0, "noise_seed": 3}
    return config_from_dict(
        {
            "task": {"shots": 5, "query": 5, "tasks_per_site": 8},
            "model": {"hidden": [8]},
            "meta": {"tasks_per_client": 2},
            "federation": {"clients_total": 4, "clients_per_round": 2, "rounds": 3},
            "privacy": {**p, **privacy},
        }
    )


def _message(kind: str, content: RecordDict) -> Message:
    meta = Metadata(
        run_id=1, message_id="m", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id="1", created_at=0.0, ttl=60.0, message_type=kind,
    )  # fmt: skip
    return Message(metadata=meta, content=content)


def _train(cfg: Config, node_config: dict[str, Any]) -> Message:
    app = build_client_app(cfg)
    meta = Experiment(cfg).initial_meta_params()
    content = fl.pack_instructions(meta, {"round": 1, "client-id": 1})
    context = Context(run_id=1, node_id=5, node_config={"client-id": 1, **node_config}, state=RecordDict(),
                      run_config={})  # fmt: skip
    return app(_message(fl.TRAIN, content), context)


def test_a_run_below_the_sites_floor_is_refused_and_the_site_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    # on main the floor keys were ignored: the site trained with whatever the submitter's config said
    weak = _cfg(noise_multiplier=0.5, target_epsilon=None)
    with caplog.at_level(logging.ERROR, logger="fedmeta.flower.client_app"):
        reply = _train(weak, FLOOR)
    assert reply.has_error()
    reason = reply.error.reason
    assert reason.startswith("PrivacyFloorViolated: this site refuses the run")
    assert "privacy.noise_multiplier=0.5 is below node config 'privacy-min-noise-multiplier'=1" in reason
    assert "privacy.target_epsilon is unset (no budget), node config 'privacy-max-epsilon'" in reason
    assert any("PrivacyFloorViolated" in r.getMessage() for r in caplog.records)
    # the server decodes it as a failed client, like a spent budget
    with pytest.raises(Exception, match="PrivacyFloorViolated"):
        fl.unpack_update(reply)


def test_a_run_that_meets_the_floor_trains() -> None:
    reply = _train(_cfg(), FLOOR)
    assert not reply.has_error()
    update, _, metrics = fl.unpack_update(reply)
    assert update and set(metrics) >= {"privacy.epsilon"}
    assert not _train(_cfg(), {}).has_error()  # no floor pinned: as before


@pytest.mark.parametrize(
    ("privacy", "needle"),
    [
        ({"mode": "none"}, "privacy.mode is 'none', node config 'privacy-mode' requires 'client-local'"),
        ({"mode": "task"}, "privacy.mode is 'task'"),
        ({"target_epsilon": 9.0}, "privacy.target_epsilon is 9, node config 'privacy-max-epsilon' allows at most 8"),
        ({"delta": 1e-4}, "privacy.delta=0.0001 exceeds node config 'privacy-max-delta'=1e-05"),
        ({"clip_norm": 3.0}, "privacy.clip_norm=3 exceeds node config 'privacy-max-clip-norm'=2"),
    ],
)
def test_each_part_of_the_floor_is_checked_naming_the_key(privacy: dict[str, Any], needle: str) -> None:
    from fedmeta.errors import PrivacyFloorViolated
    from fedmeta.privacy.site_floor import SiteFloor

    cfg = _cfg(**privacy)
    with pytest.raises(PrivacyFloorViolated, match="this site refuses the run") as err:
        SiteFloor.from_node_config(FLOOR).check(cfg)
    assert needle in str(err.value)


def test_a_malformed_floor_names_the_node_config_key() -> None:
    from fedmeta.privacy.site_floor import SiteFloor

    with pytest.raises(ConfigError, match="node config 'privacy-mode' must be one of"):
        SiteFloor.from_node_config({"privacy-mode": "strong"})
    with pytest.raises(ConfigError, match="node config 'privacy-mode' must be a differential-privacy mode"):
        SiteFloor.from_node_config({"privacy-mode": "none"})
    with pytest.raises(ConfigError, match="node config 'privacy-min-noise-multiplier' must be a number"):
        SiteFloor.from_node_config({"privacy-min-noise-multiplier": "lots"})
    reply = _train(_cfg(), {"privacy-max-epsilon": -1})
    assert reply.has_error() and "node config 'privacy-max-epsilon' must be a positive number" in reply.error.reason
