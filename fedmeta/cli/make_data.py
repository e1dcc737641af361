"""``fedmeta make-data``: write N site folders in the documented on-disk format (``docs/data-format.md``)."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from fedmeta.cli.common import add_command, add_optional

__all__ = ["register", "cmd_make_data"]


def cmd_make_data(args: argparse.Namespace) -> int:
    """``fedmeta make-data CONFIG --sites N --out DIR``."""
    from fedmeta.config import load_config
    from fedmeta.datagen import make_sites

    cfg = load_config(args.config, args.overrides)
    sites = make_sites(cfg, args.sites, args.out, tasks_per_site=args.tasks_per_site, heldout_per_site=args.heldout)
    print(f"wrote {len(sites)} site folders under {args.out}/ (format: docs/data-format.md)")
    return 0


def register(subparsers: Any, add_common: Callable[..., None]) -> None:
    """Add ``make-data`` to the ``fedmeta`` command line."""
    p = add_command(
        subparsers, "make-data", cmd_make_data, help="write N site folders in the documented on-disk format"
    )
    p.add_argument("config", help="YAML config file (its task family and seed)")
    p.add_argument("--sites", type=int, required=True, help="number of site folders")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write site-0000, site-0001, ...")
    add_optional(p, "--tasks-per-site", int, help="training tasks per site (default: task.tasks_per_site or 20)")
    p.add_argument("--heldout", type=int, default=5, help="held-out tasks per site (default 5)")
    add_common(p, out=False)
