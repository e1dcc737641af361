"""The ``ClientApp`` that ``flwr run`` loads (``[tool.flwr.app.components] clientapp``).

The handlers live in :mod:`fedmeta.flower.client_app`; this shim sets Flower's environment, then
builds the app with this directory's parent (the repository root or the unpacked app bundle,
where ``configs/`` lives) as the app directory.
"""

from __future__ import annotations

from pathlib import Path

from fedmeta.flower.env import configure_environment

configure_environment()  # before flwr is imported: the app's process may not have it set

from fedmeta.flower.client_app import build_client_app  # noqa: E402

__all__ = ["app"]

#: The ClientApp ``flwr run`` loads; its config comes from ``context.run_config``.
app = build_client_app(app_dir=Path(__file__).resolve().parents[1])
