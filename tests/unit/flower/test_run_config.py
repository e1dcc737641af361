"""Flower's run_config mapping: it round-trips a config, reads files, overrides and dotted keys, names bad keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmeta.config import load_config
from fedmeta.errors import ConfigError
from fedmeta.flower.run_config import RUN_CONFIG_KEYS, RunOptions, config_from_run_config, run_config_for, run_settings


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
        config_from_run_config(
            {"config-file": "configs/sinusoid.yaml", "overrides": "meta.inner_lr=-1"}, base_dirs=(repo_root,)
        )
    with pytest.raises(ConfigError, match="run_config is empty"):
        run_settings({})


def test_pyproject_app_config_is_what_the_apps_read(repo_root: Path) -> None:
    import tomllib

    project = tomllib.loads((repo_root / "pyproject.toml").read_text(encoding="utf-8"))
    app = project["tool"]["flwr"]["app"]
    assert "federations" not in project["tool"]["flwr"]
    assert app["components"] == {"serverapp": "server.app:app", "clientapp": "client.app:app"}
    assert set(app["config"]) == set(RUN_CONFIG_KEYS)
    cfg, _ = config_from_run_config(app["config"], base_dirs=(repo_root,))
    assert cfg == load_config(repo_root / "configs" / "sinusoid.yaml")
