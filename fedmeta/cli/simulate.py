"""``fedmeta simulate``: federated meta-training in Flower's simulation engine (:mod:`fedmeta.flower.simulation`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

__all__ = ["register", "cmd_simulate"]


def cmd_simulate(args: argparse.Namespace) -> int:
    """``fedmeta simulate CONFIG``."""
    from fedmeta.cli.common import run_training
    from fedmeta.flower.simulation import simulate

    return run_training(
        args,
        "simulate",
        lambda cfg, out, bar: simulate(
            cfg, out, resume=args.resume, progress=bar, verbose=args.debug, ray_address=args.ray_address
        ),
        bar_from_checkpoint=True,
    )


def register(subparsers: Any, add_common: Callable[..., None]) -> None:
    """Add ``simulate`` to the ``fedmeta`` command line."""
    from fedmeta.cli.common import add_training_command

    p = add_training_command(
        subparsers,
        add_common,
        "simulate",
        cmd_simulate,
        help="federated meta-training through Flower's simulation engine",
        resume_help="continue from OUT/checkpoint.pt at the next round",
    )
    p.add_argument(
        "--ray-address", metavar="HOST:PORT",
        help="join a running Ray cluster (ray start --head / --address) instead of starting Ray here",
    )
