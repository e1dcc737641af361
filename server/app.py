"""The ``ServerApp`` that ``flwr run`` loads (``[tool.flwr.app.components] serverapp``).

:func:`fedmeta.flower.server_app.build_run_config_server_app` builds it; this shim sets Flower's
environment first and passes this directory's parent (the repository root or the unpacked app
bundle, where ``configs/`` lives) as the app directory.
"""

from __future__ import annotations

from pathlib import Path

from fedmeta.flower.env import configure_environment

configure_environment()  # before flwr is imported: the app's process may not have it set

from fedmeta.flower.server_app import build_run_config_server_app  # noqa: E402

__all__ = ["app"]

#: The ServerApp ``flwr run`` loads; config and options come from ``context.run_config``.
app = build_run_config_server_app(Path(__file__).resolve().parents[1])
