"""The Flower adapter: records round-trip exactly, replies decode or are refused, run_config maps."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from fedmeta import flower as fl
from fedmeta.algorithms import MetaUpdate
from fedmeta.config import RunOptions, config_from_run_config, load_config, run_config_for
from fedmeta.errors import ConfigError, UpdateRejected
from fedmeta.experiment import Experiment
from fedmeta.federated import ClientIdentity
from flwr.app import Message, RecordDict
from flwr.app.metadata import Metadata


def _reply(content: RecordDict, src: int = 7) -> Message:
    meta = Metadata(
        run_id=1, message_id="m", src_node_id=src, dst_node_id=0, reply_to_message_id="x",
        group_id="1", created_at=0.0, ttl=60.0, message_type="train",
    )
    return Message(metadata=meta, content=content)


@pytest.fixture(scope="module")
def metasgd_params(repo_root: Path) -> dict[str, torch.Tensor]:
    cfg = load_config(repo_root / "configs" / "sinusoid.yaml", ["meta.algorithm=metasgd"])
    return Experiment(cfg).initial_meta_params()


def test_params_round_trip_is_exact_including_metasgd_rates(metasgd_params: dict[str, torch.Tensor]) -> None:
    assert any(k.startswith("lr.") for k in metasgd_params)
    back = fl.record_to_params(fl.params_to_record(metasgd_params))
    assert list(back) == list(metasgd_params)
    for key, value in metasgd_params.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert torch.equal(back[key], value)


def test_params_round_trip_keeps_float64_and_scalars() -> None:
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "s": torch.tensor(1.5, dtype=torch.float64)}
    back = fl.record_to_params(fl.params_to_record(params))
    assert back["w"].dtype == torch.float64 and torch.equal(back["w"], params["w"])
    assert back["s"].shape == () and float(back["s"]) == 1.5


def test_update_reply_round_trip(metasgd_params: dict[str, torch.Tensor]) -> None:
    update = MetaUpdate(gradient=metasgd_params, num_tasks=4, metrics={"query_loss_post": 0.25, "query_loss_pre": 1.5})
    content = fl.pack_update(update, {"compute-seconds": 0.1})
    grad, tasks, metrics = fl.unpack_update(_reply(content))
    assert tasks == 4
    assert metrics == {"query_loss_post": 0.25, "query_loss_pre": 1.5, "compute-seconds": pytest.approx(0.1)}
    assert all(torch.equal(grad[k], metasgd_params[k]) for k in metasgd_params)
    assert fl.record_nbytes(content) > sum(v.numel() * 4 for v in metasgd_params.values())


def test_reply_without_tasks_or_records_is_refused(metasgd_params: dict[str, torch.Tensor]) -> None:
    update = MetaUpdate(gradient=metasgd_params, num_tasks=0, metrics={})
    with pytest.raises(UpdateRejected, match="tasks"):
        fl.unpack_update(_reply(fl.pack_update(update)))
    with pytest.raises(UpdateRejected, match="lacks the record"):
        fl.unpack_update(_reply(RecordDict()))


def test_identity_and_instructions_round_trip(metasgd_params: dict[str, torch.Tensor]) -> None:
    ident = ClientIdentity(client_id=12, kind="classification", num_tasks=30, site="site-0012", input_shape=(1, 28, 28), output_dim=5)
    assert fl.unpack_identity(_reply(fl.pack_identity(ident))) == ident
    meta, config = fl.unpack_instructions(_reply(fl.pack_instructions(metasgd_params, {"round": 3, "client-id": 12})))
    assert config == {"round": 3, "client-id": 12}
    assert all(torch.equal(meta[k], metasgd_params[k]) for k in metasgd_params)


def test_eval_metrics_reply_refuses_non_finite() -> None:
    metrics, n = fl.unpack_eval_metrics(_reply(fl.pack_eval_metrics({"post_adapt_loss": 0.5}, 3)))
    assert metrics == {"post_adapt_loss": 0.5} and n == 3
    with pytest.raises(UpdateRejected):
        fl.unpack_eval_metrics(_reply(fl.pack_eval_metrics({"post_adapt_loss": math.nan}, 3)))


def test_run_config_round_trip(repo_root: Path) -> None:
    cfg = load_config(repo_root / "configs" / "harmonic.yaml", ["meta.algorithm=fomaml", "model.hidden=[20, 30]"])
    back, options = config_from_run_config(run_config_for(cfg, RunOptions(out_dir="/tmp/x", resume=True)))
    assert back == cfg
    assert options == RunOptions(out_dir="/tmp/x", resume=True)


def test_run_config_file_overrides_and_dotted_keys(repo_root: Path) -> None:
    run_config = {
        "config-file": "configs/sinusoid.yaml",
        "config-yaml": "",
        "overrides": "federation.rounds=7 meta.inner_lr=0.02",
        "out-dir": "",
        "resume": False,
        "task.amplitude": "[0.5, 1.0]",
        "eval.tasks": 11,
    }
    cfg, options = config_from_run_config(run_config, base_dirs=(repo_root,))
    assert (cfg.federation.rounds, cfg.meta.inner_lr, cfg.task.amplitude, cfg.eval.tasks) == (7, 0.02, (0.5, 1.0), 11)
    assert options == RunOptions()


def test_run_config_errors_name_the_key(repo_root: Path) -> None:
    with pytest.raises(ConfigError, match="unknown run_config key 'bogus'"):
        config_from_run_config({"bogus": 1})
    with pytest.raises(ConfigError, match="meta.inner_lr"):
        config_from_run_config({"config-file": "configs/sinusoid.yaml", "overrides": "meta.inner_lr=-1"}, base_dirs=(repo_root,))
    with pytest.raises(ConfigError, match="run_config is empty"):
        fl.run_settings({})


def test_pyproject_app_config_is_what_the_apps_read(repo_root: Path) -> None:
    import tomllib

    from fedmeta.config import RUN_CONFIG_KEYS

    project = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
    app = project["tool"]["flwr"]["app"]
    assert "federations" not in project["tool"]["flwr"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert set(app["config"]) == set(RUN_CONFIG_KEYS)
    cfg, _ = config_from_run_config(app["config"], base_dirs=(repo_root,))
    assert cfg == load_config(repo_root / "configs" / "sinusoid.yaml")


def test_connection_file_keeps_other_connections(tmp_path: Path) -> None:
    import tomllib

    fl.write_superlink_connection("lab", "10.0.0.5:9093", home=tmp_path, insecure=True)
    path = fl.write_superlink_connection("fedmeta-local", home=tmp_path)
    data = tomllib.loads(path.read_text(encoding="utf-8"))["superlink"]
    assert data["default"] == "fedmeta-local"
    assert data["lab"] == {"address": "10.0.0.5:9093", "insecure": True}
    assert data["fedmeta-local"] == {"address": ":local:"}


def test_environment_defaults_are_set_before_flower_loads() -> None:
    import os

    for key in ("FLWR_HOME", "RAY_TMPDIR"):
        assert os.environ.get(key)
    assert os.environ["FLWR_TELEMETRY_ENABLED"] == "0"
    assert os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
