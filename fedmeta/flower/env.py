"""Flower's process environment and the ``$FLWR_HOME`` connection file, set up by an explicit call.

Nothing in :mod:`fedmeta` changes ``os.environ`` when it is imported. Every entry point that
loads Flower or Ray (the ``fedmeta`` commands that use them, ``client/app.py``, ``server/app.py``,
the test suite's ``conftest.py``) calls :func:`configure_environment` first, because Flower and
Ray read some of these variables when they are imported.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Any

__all__ = [
    "environment_defaults",
    "configure_environment",
    "write_superlink_connection",
    "default_privacy_state_dir",
    "PRIVACY_STATE_SUBDIR",
]

#: Where, under the node's Flower home, a site keeps its privacy accountants by default.
PRIVACY_STATE_SUBDIR = Path("fedmeta") / "privacy"


def default_privacy_state_dir(environ: Mapping[str, str] | None = None) -> Path:
    """The folder a site keeps its privacy accountants in when its node config names none.

    ``$FLWR_HOME/fedmeta/privacy``, or ``~/.flwr/fedmeta/privacy`` when ``FLWR_HOME`` is not set
    (Flower's own default home): the node's own state folder, which outlives a SuperNode restart
    (Flower's ``context.state`` does not), and which ``fedmeta deploy-local`` already gives each
    site separately. One file per client id and privacy mode.

    Args:
        environ: the environment to read (default ``os.environ``).

    Returns:
        The folder (not created here).
    """
    env = os.environ if environ is None else environ
    home = env.get("FLWR_HOME") or str(Path.home() / ".flwr")
    return Path(home).expanduser() / PRIVACY_STATE_SUBDIR


def environment_defaults(cwd: str | Path | None = None) -> dict[str, str]:
    """The variables every Flower run needs on these offline machines, with their default values.

    * ``FLWR_TELEMETRY_ENABLED=0``, ``FLWR_DISABLE_UPDATE_CHECK=1``;
    * ``FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1`` (otherwise a SuperLink runs ``uv sync``
      on the app's dependencies);
    * ``FLWR_HOME``: ``.flwr_home`` under ``cwd`` (default: the current directory), so that
      connections, installed apps and logs stay with the project instead of ``~/.flwr``;
    * ``RAY_TMPDIR``: a short path under the system temp dir (Ray's socket paths have a length
      limit);
    * ``RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=0``: Ray would otherwise print a FutureWarning per run
      about accelerator variables.

    Args:
        cwd: the folder ``FLWR_HOME`` defaults into (default: the current directory).

    Returns:
        Variable name -> default value.
    """
    base = Path(cwd) if cwd is not None else Path.cwd()
    return {
        "FLWR_TELEMETRY_ENABLED": "0",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_HOME": str(base / ".flwr_home"),
        "RAY_TMPDIR": str(Path(tempfile.gettempdir()) / f"fedmeta-ray-{os.getuid()}"),
        # Ray would otherwise print a FutureWarning per run about accelerator env vars.
        "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0",
    }


def configure_environment(
    *,
    flwr_home: str | Path | None = None,
    ray_tmpdir: str | Path | None = None,
    environ: MutableMapping[str, str] | None = None,
) -> dict[str, str]:
    """Set Flower's and Ray's environment defaults; call it before ``flwr`` or ``ray`` is imported.

    Each variable of :func:`environment_defaults` is set only if it is not set already, so a
    value the user (or a launcher) exported wins. Calling it again changes nothing.

    Args:
        flwr_home: the default ``FLWR_HOME`` (default: ``./.flwr_home``).
        ray_tmpdir: the default ``RAY_TMPDIR`` (default: ``fedmeta-ray-UID`` in the temp dir).
        environ: the mapping to update (default: ``os.environ``).

    Returns:
        The variables this call set (name -> value); empty when all were set already.
    """
    env: MutableMapping[str, str] = os.environ if environ is None else environ
    defaults = environment_defaults()
    if flwr_home is not None:
        defaults["FLWR_HOME"] = str(flwr_home)
    if ray_tmpdir is not None:
        defaults["RAY_TMPDIR"] = str(ray_tmpdir)
    changed: dict[str, str] = {}
    for key, value in defaults.items():
        if key not in env:
            env[key] = value
            changed[key] = value
    return changed


def write_superlink_connection(
    name: str,
    address: str = ":local:",
    *,
    home: str | Path | None = None,
    insecure: bool | None = None,
    root_certificates: str | None = None,
    make_default: bool = True,
) -> Path:
    """Add (or replace) a SuperLink connection in ``$FLWR_HOME/config.toml`` for ``flwr run``.

    Flower 1.41/1.42 read ``flwr run . NAME``'s second argument from this file, never from
    pyproject.toml (where a ``[tool.flwr.federations]`` section would be moved here by Flower).

    Args:
        name: the connection name (``flwr run . NAME``).
        address: ``":local:"`` (Flower starts a local simulation SuperLink on first use, on
            ``$FLWR_LOCAL_SUPERLINK_HTTP_API_PORT``, default 39091) or ``host:port`` of a running
            SuperLink.
        home: the Flower home (default: ``$FLWR_HOME``).
        insecure: connect without TLS (``host:port`` addresses).
        root_certificates: CA certificate file for TLS.
        make_default: make it the connection ``flwr run .`` uses when none is named.

    Returns:
        The config file written.
    """
    import tomllib

    import tomli_w

    root = Path(home) if home is not None else Path(os.environ["FLWR_HOME"])
    path = root / "config.toml"
    data: dict[str, Any] = {}
    if path.is_file():
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    links = data.setdefault("superlink", {})
    entry: dict[str, Any] = {"address": address}
    if insecure is not None:
        entry["insecure"] = insecure
    if root_certificates:
        entry["root-certificates"] = str(Path(root_certificates).resolve())
    links[name] = entry
    if make_default or "default" not in links:
        links["default"] = name
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(data), encoding="utf-8")
    return path
