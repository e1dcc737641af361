"""Write a SuperLink connection for ``flwr run . NAME`` into the project's Flower home.

Usage (from the repository root)::

    export FLWR_HOME=$PWD/.flwr_home
    .venv/bin/python scripts/flwr_connection.py                      # fedmeta-local -> :local:
    .venv/bin/python scripts/flwr_connection.py --name lab --address 10.0.0.5:9093 --root-certificates ca.crt

``:local:`` makes ``flwr run`` start a local simulation SuperLink (detached; it keeps running
after the command: stop it with ``kill PID``, PID from ``ps``). The number of virtual clients
is given per run: ``flwr run . fedmeta-local --federation-config "num-supernodes=100"``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path


def main() -> None:
    """Parse arguments and write the connection."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="fedmeta-local", help="connection name (default fedmeta-local)")
    parser.add_argument("--address", default=":local:", help="':local:' or host:port of a SuperLink")
    parser.add_argument(
        "--home",
        default=os.environ.get("FLWR_HOME", str(Path.cwd() / ".flwr_home")),
        help="Flower home (default $FLWR_HOME or ./.flwr_home)",
    )
    parser.add_argument("--insecure", action="store_true", help="no TLS (host:port addresses)")
    parser.add_argument("--root-certificates", default=None, help="CA certificate for TLS")
    args = parser.parse_args()
    os.environ.setdefault("FLWR_HOME", args.home)
    from fedmeta.flower.env import write_superlink_connection

    path = write_superlink_connection(
        args.name,
        args.address,
        home=args.home,
        insecure=True if args.insecure else None,
        root_certificates=args.root_certificates,
    )
    print(
        f"wrote connection '{args.name}' ({args.address}) to {path}; use: FLWR_HOME={args.home} flwr run . {args.name}"
    )


if __name__ == "__main__":
    main()
