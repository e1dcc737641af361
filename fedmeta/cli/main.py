"""The ``fedmeta`` command line (SPEC §9). Errors become one paragraph and a non-zero exit."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmeta.errors import FedMetaError

__all__ = ["main", "build_parser"]

log = logging.getLogger("fedmeta")


def _add_common(p: argparse.ArgumentParser, *, out: bool = True, overrides: bool = True) -> None:
    if out:
        p.add_argument("--out", metavar="DIR", help="output directory (default: runs/<command>-<config name>)")
    if overrides:
        p.add_argument(
            "--set",
            dest="overrides",
            metavar="KEY=VALUE",
            action="extend",
            nargs="+",
            default=[],
            help="override a config key by its dotted path, e.g. --set meta.inner_lr=0.02",
        )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="no progress bar, warnings only")


def _default_out(command: str, config: str) -> Path:
    return Path("runs") / f"{command}-{Path(config).stem}"


class _Progress:
    """A tqdm bar over rounds showing the latest training and evaluation losses."""

    def __init__(self, total: int, *, enabled: bool, start: int = 0) -> None:
        from tqdm import tqdm

        # tqdm disables itself when stderr is not a terminal (disable=None); then eval rows are logged
        self.bar = tqdm(total=total, initial=start, unit="round", disable=None if enabled else True, dynamic_ncols=True, file=sys.stderr)
        self.log_evals = enabled and bool(self.bar.disable)

    def __call__(self, round_idx: int, row: dict[str, Any]) -> None:
        post: dict[str, str] = {}
        train = row.get("train") or {}
        if "query_loss_post" in train:
            post["train"] = f"{train['query_loss_post']:.3f}"
        ev = row.get("eval") or {}
        if "post_adapt_loss" in ev:
            post["heldout"] = f"{ev['post_adapt_loss']:.3f}"
        if "post_adapt_accuracy" in ev:
            post["acc"] = f"{ev['post_adapt_accuracy']:.3f}"
        if row.get("privacy", {}).get("epsilon") is not None:
            post["eps"] = f"{row['privacy']['epsilon']:.2f}"
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)
        if self.log_evals and ev:
            log.info("round %d: %s", round_idx, ", ".join(f"{k}={v}" for k, v in post.items()))

    def close(self) -> None:
        self.bar.close()


def _report(summary: dict[str, Any], out: Path) -> None:
    final = summary.get("final") or {}
    parts = [f"{summary.get('algorithm')} on {summary.get('task')}: {summary.get('rounds_completed')} rounds"]
    if "pre_adapt_loss" in final:
        parts.append(
            f"held-out loss {final['pre_adapt_loss']:.4f} before adaptation, "
            f"{final['post_adapt_loss']:.4f} ± {final.get('post_adapt_loss_ci95', 0):.4f} after {final.get('steps')} steps"
        )
    if "post_adapt_accuracy" in final:
        parts.append(
            f"accuracy {final['pre_adapt_accuracy']:.3f} -> {final['post_adapt_accuracy']:.3f} ± {final.get('post_adapt_accuracy_ci95', 0):.3f}"
        )
    eps = (summary.get("privacy") or {}).get("epsilon")
    parts.append("no differential privacy" if eps is None else f"privacy spent: epsilon={eps:.3f}, delta={summary['privacy']['delta']:g}")
    if (summary.get("privacy") or {}).get("stopped_by_budget"):
        parts.append(f"stopped by privacy.target_epsilon after {summary.get('rounds_completed')} of {summary.get('rounds_planned')} rounds")
    print("; ".join(parts) + f". Outputs in {out}/", file=sys.stdout)


def cmd_centralized(args: argparse.Namespace) -> int:
    from fedmeta.centralized import run_centralized
    from fedmeta.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else _default_out("centralized", args.config)
    bar = _Progress(cfg.federation.rounds, enabled=not args.quiet)
    try:
        summary = run_centralized(cfg, out, resume=args.resume, progress=bar)
    finally:
        bar.close()
    _report(summary, out)
    return 0


def cmd_make_data(args: argparse.Namespace) -> int:
    from fedmeta.config import load_config
    from fedmeta.datagen import make_sites

    cfg = load_config(args.config, args.overrides)
    sites = make_sites(cfg, args.sites, args.out, tasks_per_site=args.tasks_per_site, heldout_per_site=args.heldout)
    print(f"wrote {len(sites)} site folders under {args.out}/ (format: docs/data-format.md)")
    return 0


Command = Callable[[argparse.Namespace], int]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedmeta",
        description="Federated meta-learning on Flower: MAML, FOMAML, Reptile, Meta-SGD, ANIL with differential privacy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("centralized", help="the same meta-learning math in one process: the reference")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt")
    _add_common(p)
    p.set_defaults(func=cmd_centralized)

    p = sub.add_parser("make-data", help="write N site folders in the documented on-disk format")
    p.add_argument("config", help="YAML config file (its task family and seed)")
    p.add_argument("--sites", type=int, required=True, help="number of site folders")
    p.add_argument("--out", required=True, metavar="DIR", help="where to write site-0000, site-0001, ...")
    p.add_argument("--tasks-per-site", type=int, default=None, help="training tasks per site (default: task.tasks_per_site or 20)")
    p.add_argument("--heldout", type=int, default=5, help="held-out tasks per site (default 5)")
    _add_common(p, out=False)
    p.set_defaults(func=cmd_make_data)

    for register in _extra_commands():
        register(sub, _add_common)
    return parser


def _extra_commands() -> list[Callable[..., None]]:
    """Subcommands contributed by other modules (federation, privacy, deployment, adaptation)."""
    found = []
    for module in ("fedmeta.cli_federated", "fedmeta.cli_privacy", "fedmeta.cli_deploy", "fedmeta.cli_adapt"):
        try:
            mod = __import__(module, fromlist=["register"])
        except ModuleNotFoundError as exc:
            if exc.name == module:
                continue
            raise
        found.append(mod.register)
    return found


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedmeta`` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    # third-party INFO chatter (alembic: the migrations of Flower's link state database)
    for noisy in ("matplotlib", "PIL", "fontTools", "alembic"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except FedMetaError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"fedmeta {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"fedmeta {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the CLI's last line of defence: no traceback by default
        if args.debug:
            traceback.print_exc()
        else:
            print(
                f"fedmeta {args.command}: internal error ({type(exc).__name__}: {exc}). "
                "Rerun with --debug for the traceback and report it.",
                file=sys.stderr,
            )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
