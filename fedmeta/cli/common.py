"""What the ``fedmeta`` commands share: the common options, default output folders, the progress bar, the report."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = [
    "add_command",
    "add_common",
    "add_optional",
    "add_training_command",
    "default_out",
    "Progress",
    "report",
    "run_training",
]

log = logging.getLogger("fedmeta")


def add_common(p: argparse.ArgumentParser, *, out: bool = True, overrides: bool = True) -> None:
    """Add ``--out`` (unless ``out=False``), ``--set`` (unless ``overrides=False``), ``--debug``, ``--quiet``.

    Args:
        p: the sub-command's parser, changed in place.
        out: whether to add ``--out``.
        overrides: whether to add ``--set``.
    """
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


def add_command(
    subparsers: Any, name: str, func: Callable[[argparse.Namespace], int], **kwargs: Any
) -> argparse.ArgumentParser:
    """Add the sub-command ``name``, run by ``func``; its parser, for the command's own options.

    Args:
        subparsers: the ``fedmeta`` parser's sub-command actions.
        name: the command's name.
        func: runs the command on the parsed arguments and returns the exit status.
        **kwargs: for ``add_parser`` (``help``, ``description``).
    """
    p: argparse.ArgumentParser = subparsers.add_parser(name, **kwargs)
    p.set_defaults(func=func)
    return p


def add_optional(
    p: argparse.ArgumentParser, flag: str, kind: Callable[[str], Any], *, help: str, metavar: str | None = None
) -> None:
    """Add ``flag``: an optional value of type ``kind``; left out it is ``None``, the default ``help`` names.

    Args:
        p: the sub-command's parser, changed in place.
        flag: the option, e.g. ``--pool-size``.
        kind: converts the given string (``int``, ``float``, ...).
        help: what the option means and what its absence means.
        metavar: the value's name in the usage line (default: from ``flag``).
    """
    p.add_argument(flag, type=kind, default=None, metavar=metavar, help=help)


def default_out(command: str, config: str) -> Path:
    """``runs/<command>-<config name>``: where a command writes when ``--out`` is not given."""
    return Path("runs") / f"{command}-{Path(config).stem}"


class Progress:
    """A tqdm bar over rounds (with tqdm's rate and ETA) showing client updates per second and the latest losses."""

    def __init__(self, total: int, *, enabled: bool, start: int = 0) -> None:
        from tqdm import tqdm

        self.updates = 0
        self.started = time.monotonic()

        # tqdm disables itself when stderr is not a terminal (disable=None); then eval rows are logged
        self.bar = tqdm(
            total=total,
            initial=start,
            unit="round",
            disable=None if enabled else True,
            dynamic_ncols=True,
            file=sys.stderr,
        )
        self.log_evals = enabled and bool(self.bar.disable)

    def __call__(self, round_idx: int, row: dict[str, Any]) -> None:
        post = self.postfix(row)
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(1)
        if self.log_evals and row.get("eval"):
            log.info("round %d: %s", round_idx, ", ".join(f"{k}={v}" for k, v in post.items()))

    def postfix(self, row: dict[str, Any]) -> dict[str, str]:
        """Count the round's client updates and return what the bar shows after it (name -> text).

        Args:
            row: the round's metrics row.

        Returns:
            Client updates per second since the bar started, the latest training and held-out losses,
            the held-out accuracy and epsilon, each when the row has it.
        """
        post: dict[str, str] = {}
        # replies accepted this round (a row without them, e.g. a round's eval-only row, adds none)
        self.updates += int(row.get("replies") or 0)
        elapsed = time.monotonic() - self.started
        if self.updates and elapsed > 0:
            post["upd/s"] = f"{self.updates / elapsed:.0f}"
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
        return post

    def close(self) -> None:
        self.bar.close()


def _num(value: Any, spec: str) -> str:
    """``value`` formatted with ``spec``; a metric written as null (not finite: a diverged run) says so."""
    return "not finite" if value is None else format(value, spec)


def report(summary: dict[str, Any], out: Path) -> None:
    """Print a run's outcome in one line: rounds, held-out loss and accuracy, privacy spent, outputs."""
    final = summary.get("final") or {}
    parts = [f"{summary.get('algorithm')} on {summary.get('task')}: {summary.get('rounds_completed')} rounds"]
    if "pre_adapt_loss" in final:
        parts.append(
            f"held-out loss {_num(final['pre_adapt_loss'], '.4f')} before adaptation, "
            f"{_num(final['post_adapt_loss'], '.4f')} ± {_num(final.get('post_adapt_loss_ci95', 0), '.4f')} after "
            f"{final.get('steps')} steps"
        )
    if "post_adapt_accuracy" in final:
        parts.append(
            f"accuracy {_num(final['pre_adapt_accuracy'], '.3f')} -> {_num(final['post_adapt_accuracy'], '.3f')} ± "
            f"{_num(final.get('post_adapt_accuracy_ci95', 0), '.3f')}"
        )
    eps = (summary.get("privacy") or {}).get("epsilon")
    parts.append(
        "no differential privacy"
        if eps is None
        else f"privacy spent: epsilon={eps:.3f}, delta={summary['privacy']['delta']:g}"
    )
    if (summary.get("privacy") or {}).get("stopped_by_budget"):
        parts.append(
            f"stopped by privacy.target_epsilon after {summary.get('rounds_completed')} of "
            f"{summary.get('rounds_planned')} rounds"
        )
    print("; ".join(parts) + f". Outputs in {out}/", file=sys.stdout)


def run_training(
    args: argparse.Namespace,
    command: str,
    train: Callable[[Config, Path, Progress], dict[str, Any]],
    *,
    bar_from_checkpoint: bool = False,
) -> int:
    """Load ``args.config`` (with ``--set``), train into ``--out`` under a progress bar, print the summary.

    Args:
        args: the parsed ``config``, ``--set``, ``--out``, ``--resume`` and ``--quiet``.
        command: names the default output folder (``runs/<command>-<config name>``).
        train: runs the training: ``train(cfg, out, bar)`` returns the run's summary.
        bar_from_checkpoint: on ``--resume``, start the bar at the checkpoint's round.

    Returns:
        The exit status, 0.

    Raises:
        ConfigError: from the config or the run (the CLI reports it).
        CheckpointError: when resuming from a missing or corrupt checkpoint.
    """
    from fedmeta.config import load_config

    cfg = load_config(args.config, args.overrides)
    out = Path(args.out) if args.out else default_out(command, args.config)
    start = 0
    if bar_from_checkpoint and args.resume:
        from fedmeta.checkpoint import load_checkpoint

        start = int(load_checkpoint(out / "checkpoint.pt")["round"])
    bar = Progress(cfg.federation.rounds, enabled=not args.quiet, start=start)
    try:
        summary = train(cfg, out, bar)
    finally:
        bar.close()
    report(summary, out)
    return 0


def add_training_command(
    subparsers: Any,
    add_common: Callable[..., None],
    name: str,
    func: Callable[[argparse.Namespace], int],
    *,
    help: str,
    resume_help: str,
) -> argparse.ArgumentParser:
    """Add a training command (``centralized``, ``simulate``): ``CONFIG``, ``--resume`` and the common options.

    Args:
        subparsers: the ``fedmeta`` parser's sub-command actions.
        add_common: adds ``--out``, ``--set``, ``--debug``, ``--quiet`` (:func:`add_common`).
        name: the command's name.
        func: runs the command on the parsed arguments and returns the exit status.
        help: the command's one-line help.
        resume_help: what ``--resume`` continues from.

    Returns:
        The command's parser (for options of its own).
    """
    p = add_command(subparsers, name, func, help=help)
    p.add_argument("config", help="YAML config file")
    p.add_argument("--resume", action="store_true", help=resume_help)
    add_common(p)
    return p
