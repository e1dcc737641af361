"""``fedmeta centralized``: the same meta-learning math in one process, the reference for federated runs."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["register", "cmd_centralized"]


def cmd_centralized(args: argparse.Namespace) -> int:
    """``fedmeta centralized CONFIG``."""
    from fedmeta.centralized import run_centralized
    from fedmeta.cli.common import run_training

    return run_training(
        args, "centralized", lambda cfg, out, bar: run_centralized(cfg, out, resume=args.resume, progress=bar)
    )


def register(subparsers: Any, add_common: Callable[..., None]) -> None:
    """Add ``centralized`` to the ``fedmeta`` command line."""
    from fedmeta.cli.common import add_training_command

    add_training_command(
        subparsers,
        add_common,
        "centralized",
        cmd_centralized,
        help="the same meta-learning math in one process: the reference",
        resume_help="continue from OUT/checkpoint.pt",
    )
