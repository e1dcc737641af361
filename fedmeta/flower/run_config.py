"""Flower's ``run_config`` mapping: read into a :class:`~fedmeta.config.Config`, and written from one.

``[tool.flwr.app.config]`` in pyproject.toml and ``flwr run --run-config`` give the apps a flat
mapping; this module is the only place that reads or writes it. It imports no Flower module.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedmeta.config import Config, apply_overrides, config_from_dict, load_config, to_dict
from fedmeta.errors import ConfigError

__all__ = ["RUN_CONFIG_KEYS", "RunOptions", "config_from_run_config", "run_config_for", "run_settings"]

#: The keys of ``[tool.flwr.app.config]``. Flower only lets ``flwr run --run-config`` override
#: keys that pyproject.toml declares, so every key the apps read is listed there.
RUN_CONFIG_KEYS = ("config-file", "config-yaml", "overrides", "out-dir", "resume")


@dataclass(frozen=True)
class RunOptions:
    """What a Flower run needs besides the :class:`~fedmeta.config.Config`: where outputs go, and whether to resume."""

    out_dir: str = ""
    resume: bool = False


def config_from_run_config(
    run_config: dict[str, Any], *, base_dirs: tuple[Path, ...] = ()
) -> tuple[Config, RunOptions]:
    """Build the run's :class:`~fedmeta.config.Config` from Flower's ``run_config`` mapping.

    Keys (all optional):

    * ``config-yaml``: the whole config as YAML text (wins over ``config-file``);
    * ``config-file``: a YAML config file, absolute or relative to one of ``base_dirs`` (the app
      directory, which Flower's app bundle ships with ``configs/``) or the current directory;
    * ``overrides``: space-separated ``dotted.key=value`` items, exactly like ``--set``;
    * any dotted config key (``meta.inner_lr``), as :func:`fedmeta.config.to_flat` writes them;
    * ``out-dir`` and ``resume``: returned as :class:`RunOptions`.

    Raises:
        ConfigError: for an unknown key, an unreadable file, or an invalid config.
    """
    import shlex

    flat = dict(run_config)
    options = RunOptions(out_dir=str(flat.pop("out-dir", "") or ""), resume=bool(flat.pop("resume", False)))
    text = str(flat.pop("config-yaml", "") or "")
    path = str(flat.pop("config-file", "") or "")
    overrides = shlex.split(str(flat.pop("overrides", "") or ""))
    for key, value in flat.items():
        if "." not in key:
            raise ConfigError(
                f"unknown run_config key '{key}' (known: {', '.join(RUN_CONFIG_KEYS)} and dotted config keys)"
            )
        if isinstance(value, str) and (value == "null" or value.startswith("[")):
            value = yaml.safe_load(value)
        overrides.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    if text:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"run_config key 'config-yaml' is not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"run_config key 'config-yaml' must hold a YAML mapping, got {type(data).__name__}")
        return config_from_dict(apply_overrides(data, overrides), source="run_config 'config-yaml'"), options
    if path:
        candidate = Path(path)
        if not candidate.is_absolute():
            for base in (*base_dirs, Path.cwd()):
                if (base / candidate).is_file():
                    candidate = base / candidate
                    break
        return load_config(candidate, overrides), options
    return config_from_dict(apply_overrides({}, overrides), source="run_config"), options


def run_config_for(cfg: Config, options: RunOptions | None = None) -> dict[str, Any]:
    """The ``run_config`` mapping that makes :func:`config_from_run_config` return ``cfg``.

    Used by launchers that pass a config to ``flwr run`` (``--run-config`` with a TOML file).
    """
    options = options or RunOptions()
    return {
        "config-yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False),
        "config-file": "",
        "overrides": "",
        "out-dir": options.out_dir,
        "resume": options.resume,
    }


def run_settings(run_config: Mapping[str, Any], *, app_dir: Path | None = None) -> tuple[Config, RunOptions]:
    """The run's config and options from ``context.run_config`` (``flwr run``: ``[tool.flwr.app.config]``).

    Raises:
        ConfigError: if the run_config is empty (``run_simulation`` leaves it empty: the
            ``fedmeta simulate`` apps carry their config instead) or invalid.
    """
    if not run_config:
        raise ConfigError(
            "the Flower run_config is empty: start runs with `fedmeta simulate CONFIG` or with "
            "`flwr run .` (which reads [tool.flwr.app.config] in pyproject.toml)"
        )
    return config_from_run_config(dict(run_config), base_dirs=(app_dir,) if app_dir else ())
