"""``fedmeta simulate``: federated meta-training in Flower's simulation engine (:mod:`fedmeta.flower.simulation`)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["register", "cmd_simulate"]


def cmd_simulate(args: argparse.Namespace) -> int:
    """``fedmeta simulate CONFIG``."""
    from fedmeta.cli.common import Progress, default_out, report
    from fedmeta.config import load_config
    from fedmeta.flower.simulation import simulate

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else default_out("simulate", args.config)
    start = 0
    if args.resume:
        from fedmeta.checkpoint import load_checkpoint

        start = int(load_checkpoint(out / "checkpoint.pt")["round"])
    bar = Progress(cfg.federation.rounds, enabled=not args.quiet, start=start)
    try:
        summary = simulate(cfg, out, resume=args.resume, progress=bar, verbose=args.debug)
    finally:
        bar.close()
    report(summary, out)
    return 0


def register(subparsers: Any, add_common: Callable[..., None]) -> None:
    """Add ``simulate`` to the ``fedmeta`` command line."""
    p = subparsers.add_parser("simulate", help="federated meta-training through Flower's simulation engine")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt at the next round")
    add_common(p)
    p.set_defaults(func=cmd_simulate)
