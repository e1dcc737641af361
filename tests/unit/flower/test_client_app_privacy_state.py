"""A site's privacy accountant outlives its SuperNode: the ClientApp persists it by default.

A SuperNode restart gives the ClientApp a fresh ``Context`` (empty ``context.state``). Without a
``privacy-state-dir`` node config the accountant must still come back, from the node's default
state folder (``$FLWR_HOME/fedmeta/privacy``), so the site's budget does not reset.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from flwr.app import Context, Message, RecordDict
from flwr.app.metadata import Metadata

from fedmeta.experiment import Experiment
from fedmeta.flower import records as fl
from fedmeta.flower.client_app import build_client_app
from fedmeta.privacy.client_update import client_state_path
from tests.privacy_helpers import dp_config, opacus_rdp_epsilon


def _train(app: object, exp: Experiment, round_idx: int, context: Context) -> Message:
    meta = Metadata(
        run_id=1, message_id=f"m{round_idx}", src_node_id=0, dst_node_id=5, reply_to_message_id="",
        group_id=str(round_idx), created_at=0.0, ttl=600.0, message_type="train",
    )  # fmt: skip
    content = fl.pack_instructions(exp.initial_meta_params(), {"round": round_idx, "client-id": 0})
    return app(Message(metadata=meta, content=content), context)  # type: ignore[operator]


def _fresh_node(node_config: dict[str, str | int]) -> Context:
    """The Context a (re)started SuperNode gives the app: no state from before."""
    return Context(run_id=1, node_id=5, node_config=dict(node_config), state=RecordDict(), run_config={})


def test_default_state_dir_is_under_the_nodes_flower_home(tmp_path: Path) -> None:
    from fedmeta.flower.env import default_privacy_state_dir

    assert default_privacy_state_dir({"FLWR_HOME": str(tmp_path)}) == tmp_path / "fedmeta" / "privacy"
    assert default_privacy_state_dir({}) == Path.home() / ".flwr" / "fedmeta" / "privacy"


@pytest.mark.parametrize("mode", ["task", "client-local"])
def test_a_restarted_supernode_continues_its_sites_accountant(
    mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    cfg = dp_config(mode, noise_multiplier=1.3)
    exp = Experiment(cfg)
    app = build_client_app(cfg)
    node = {"partition-id": 0}
    first = _train(app, exp, 1, _fresh_node(node))
    assert not first.has_error()
    saved = client_state_path(tmp_path / "flwr_home" / "fedmeta" / "privacy", 0, mode)
    assert saved.is_file()  # written (atomically) before the reply left
    second = _train(app, exp, 2, _fresh_node(node))  # the SuperNode restarted between the rounds
    assert not second.has_error()
    _, _, metrics = fl.unpack_update(second)
    assert metrics["privacy.steps"] == 2  # both releases are counted, not just the one since the restart
    if mode == "task":
        expected = opacus_rdp_epsilon(1.3, 3 / 12, 2)
    else:
        expected = opacus_rdp_epsilon(1.3 / 2, 1.0, 2)
    assert metrics["privacy.epsilon"] == pytest.approx(expected, rel=1e-6)


def test_a_node_config_state_dir_takes_precedence(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    cfg = dp_config("task")
    exp = Experiment(cfg)
    app = build_client_app(cfg)
    node = {"partition-id": 0, "privacy-state-dir": str(tmp_path / "site")}
    assert not _train(app, exp, 1, _fresh_node(node)).has_error()
    assert client_state_path(tmp_path / "site", 0, "task").is_file()
    assert not (tmp_path / "flwr_home" / "fedmeta").exists()
