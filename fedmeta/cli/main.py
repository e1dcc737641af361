"""The ``fedmeta`` command line (SPEC §9): parsing and dispatch. Errors become one paragraph and a non-zero exit.

Each command (or group of commands) is a module of :mod:`fedmeta.cli` with a ``register``
function; its imports of the library happen when the command runs, so ``fedmeta --help`` stays
fast and importing the CLI loads neither torch nor Flower.
"""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
from collections.abc import Callable

from fedmeta.cli import adapt, centralized, deploy, make_data, privacy, simulate
from fedmeta.cli.common import add_common
from fedmeta.errors import FedMetaError

__all__ = ["main", "build_parser"]

Command = Callable[[argparse.Namespace], int]

#: The command modules, in the order ``fedmeta --help`` lists them; each has ``register(subparsers, add_common)``.
_COMMANDS = (centralized, make_data, simulate, privacy, deploy, adapt)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    parser = argparse.ArgumentParser(
        prog="fedmeta",
        description="Federated meta-learning on Flower: MAML, FOMAML, Reptile, Meta-SGD, ANIL with differential "
                    "privacy.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    for command in _COMMANDS:
        command.register(sub, add_common)
    return parser


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
