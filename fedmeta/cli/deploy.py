"""``fedmeta deploy-local``, ``fedmeta make-certs`` and ``fedmeta make-node-key``.

``deploy-local`` runs a config through a real Flower deployment on this machine — a SuperLink
and one SuperNode per site on 127.0.0.1, with TLS and SuperNode authentication unless
``--insecure`` — and writes the usual outputs (:func:`fedmeta.flower.deploy.local.run_local`). The two key
commands create what an operator needs for a deployment across machines
(``docs/deployment.md``): a CA and the SuperLink's certificate, and a site's node key pair.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fedmeta.cli.common import add_command, add_optional

__all__ = ["register", "cmd_deploy_local", "cmd_make_certs", "cmd_make_node_key"]

log = logging.getLogger(__name__)


def cmd_deploy_local(args: argparse.Namespace) -> int:
    """``fedmeta deploy-local CONFIG --sites N --out DIR``."""
    from fedmeta.cli.common import Progress, report
    from fedmeta.config import load_config
    from fedmeta.flower.deploy.local import run_local, terminate_on_signals
    from fedmeta.flower.env import configure_environment

    configure_environment()  # the Flower processes inherit this environment
    cfg = load_config(args.config, args.overrides)
    out = Path(args.out)
    start = 0
    if args.resume:
        from fedmeta.checkpoint import load_checkpoint

        start = int(load_checkpoint(out / "checkpoint.pt")["round"])
    secure = not args.insecure
    if not secure:
        log.warning(
            "--insecure: plain HTTP without TLS and without SuperNode authentication (use only on a trusted machine)"
        )
    bar = Progress(cfg.federation.rounds, enabled=not args.quiet, start=start)
    try:
        with terminate_on_signals():
            result = run_local(
                cfg,
                out,
                sites=args.sites,
                data=args.data,
                tls=secure,
                node_auth=secure and not args.no_node_auth,
                resume=args.resume,
                keep_files=args.keep_logs,
                timeout=args.timeout,
                progress=bar,
            )
    finally:
        bar.close()
    d = result.summary["deployment"]
    print(
        f"deployment of {d['sites']} sites "
        f"({'TLS + node authentication' if d['node_auth'] else 'TLS' if d['tls'] else 'insecure'}): "
        f"start-up {d['startup_seconds']:.1f}s, run {d['run_seconds']:.1f}s (run id {result.run_id})",
        file=sys.stdout,
    )
    report(result.summary, out)
    return 0


def cmd_make_certs(args: argparse.Namespace) -> int:
    """``fedmeta make-certs --out DIR [--host H ...]``."""
    from fedmeta.flower.deploy.certs import make_tls

    files = make_tls(args.out, hosts=args.host or ["127.0.0.1", "localhost"], days=args.days)
    print(
        f"CA: {files.ca_cert} (key {files.ca_key}, keep it offline); SuperLink certificate: {files.server_cert} "
        f"(key {files.server_key}). Give {files.ca_cert.name} to every site and to whoever runs `flwr`."
    )
    return 0


def cmd_make_node_key(args: argparse.Namespace) -> int:
    """``fedmeta make-node-key PATH``."""
    from fedmeta.flower.deploy.certs import make_node_key

    path = Path(args.path)
    if path.exists() and not args.force:
        from fedmeta.errors import ConfigError

        raise ConfigError(
            f"key file '{path}' exists; use --force to replace it (the old public key then stops working)"
        )
    key = make_node_key(path, comment=args.comment or path.name)
    print(
        f"private key {key.private} (stays on this site: flower-supernode --auth-supernode-private-key), "
        f"public key {key.public} (send it to the server operator: flwr supernode register)"
    )
    return 0


def register(subparsers: Any, add_common: Callable[..., None]) -> None:
    """Add ``deploy-local``, ``make-certs`` and ``make-node-key`` to the ``fedmeta`` command line."""
    p = add_command(
        subparsers,
        "deploy-local",
        cmd_deploy_local,
        help="run a config over a real SuperLink and N SuperNodes on 127.0.0.1, then tear them down",
        description=(
            "Writes N site folders (make-data), starts a SuperLink and one SuperNode per site on 127.0.0.1 "
            "with TLS and SuperNode authentication (default), runs the config with `flwr run`, writes "
            "summary.json, metrics.jsonl, checkpoint.pt and plots into --out, and stops every process, also "
            "on failure or Ctrl-C. See docs/deployment.md."
        ),
    )
    p.add_argument("config", help="YAML config file")
    add_optional(p, "--sites", int, help="number of sites (SuperNodes); required unless --data")
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="output directory (sites in DIR/sites, deployment files in DIR/deploy)",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        default=None,
        help="existing site folders (a folder of site-* folders) instead of generated ones",
    )
    security = p.add_mutually_exclusive_group()
    security.add_argument("--tls", action="store_true", help="TLS and SuperNode authentication (the default)")
    security.add_argument(
        "--insecure", action="store_true", help="plain HTTP, no TLS, no node authentication (trusted machine only)"
    )
    p.add_argument(
        "--no-node-auth",
        action="store_true",
        help="TLS but no SuperNode authentication (any node with the CA certificate may join)",
    )
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt at the next round")
    p.add_argument(
        "--keep-logs", action="store_true",
        help="keep DIR/deploy (process logs, keys, Flower homes) after a successful run",
    )  # fmt: skip
    add_optional(
        p, "--timeout", float, metavar="SECONDS",
        help="limit on the run itself (default: derived from rounds and federation.round_timeout)",
    )  # fmt: skip
    add_common(p, out=False)

    p = add_command(
        subparsers, "make-certs", cmd_make_certs, help="create a test CA and the SuperLink's TLS certificate"
    )
    p.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="folder for ca.crt, ca.key, server.pem, server.key (an existing CA there is reused)",
    )
    p.add_argument(
        "--host",
        action="append",
        metavar="HOST",
        help="IP or DNS name clients use to reach the SuperLink (repeatable; default 127.0.0.1 and localhost)",
    )
    p.add_argument("--days", type=int, default=365, help="validity in days (default 365)")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="warnings only")

    p = add_command(
        subparsers,
        "make-node-key",
        cmd_make_node_key,
        help="create a site's SuperNode authentication key pair (ECDSA P-384, OpenSSH)",
    )
    p.add_argument("path", help="private key file; the public key is written to PATH.pub")
    p.add_argument("--comment", default=None, help="comment after the public key (default: the file name)")
    p.add_argument("--force", action="store_true", help="replace an existing key")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    p.add_argument("--quiet", action="store_true", help="warnings only")
