"""``fedmeta adapt`` and ``fedmeta predict``: a new site adapts the published initialization, offline.

Both are thin: they parse arguments and call :mod:`fedmeta.adaptation`, which raises
:mod:`fedmeta.errors` exceptions for bad input (the CLI turns them into one paragraph and a
non-zero exit).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fedmeta.cli.common import add_command, add_optional

__all__ = ["register", "cmd_adapt", "cmd_predict"]


def cmd_adapt(args: argparse.Namespace) -> int:
    """Run ``fedmeta adapt``: adapt, compare against baselines, save models, print a summary."""
    from fedmeta.adaptation import adapt_site, format_summary

    out = Path(args.out) if args.out else Path("runs") / f"adapt-{Path(args.data).resolve().name}"
    report = adapt_site(
        args.checkpoint, args.data, out, steps=args.steps, shots=args.shots, query=args.query, episodes=args.episodes,
        split=args.split, seed=args.seed, compare=args.compare, save_models=not args.no_save, ways=args.ways,
    )  # fmt: skip
    if args.json:
        print(json.dumps({k: report[k] for k in ("checkpoint", "site", "settings")} | {
            "initializations": {k: v["aggregate"] for k, v in report["initializations"].items()},
            "report": str(out / "adapt_report.json"),
        }, indent=2))
    else:
        print(format_summary(report))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    """Run ``fedmeta predict``: load personalized models and predict for new inputs."""
    from fedmeta.adaptation import load_personalized, read_inputs
    from fedmeta.errors import ConfigError

    models = load_personalized(args.models)
    x = read_inputs(args.input)
    pred = models.predict(args.task, x)
    task = args.task if args.task is not None else models.tasks[0]
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.suffix == ".npz":
            np.savez(out, y=pred, outputs=models.outputs(task, x).numpy())
        elif out.suffix == ".json":
            out.write_text(json.dumps({"task": task, "predictions": pred.tolist()}) + "\n", encoding="utf-8")
        else:
            raise ConfigError(f"--out '{out}' must end in .npz or .json")
        print(f"{len(pred)} predictions for task {task} written to {out}")
    else:
        print(json.dumps({"task": task, "predictions": pred.tolist()}))
    return 0


def register(subparsers: argparse._SubParsersAction, add_common: Callable[..., None]) -> None:
    """Add the ``adapt`` and ``predict`` subcommands to the ``fedmeta`` parser."""
    p = add_command(
        subparsers,
        "adapt",
        cmd_adapt,
        help="a new site adapts the published initialization to its own tasks, offline",
        description=(
            "Load a published checkpoint (safely: tensors only), check that it fits the site's data, "
            "adapt to each task with the checkpoint's inner-loop rules, and report query metrics before "
            "and after adaptation (per task and for the site, with 95%% intervals over support/query "
            "episodes) next to the same adaptation from a random initialization and, with --compare, "
            "from another checkpoint (e.g. FedAvg-trained). Saves personalized models for `fedmeta predict`. "
            "The data format is in docs/data-format.md; joining federated training later: docs/deployment.md."
        ),
    )
    p.add_argument("--checkpoint", required=True, metavar="FILE", help="the published checkpoint.pt")
    p.add_argument("--data", required=True, metavar="DIR", help="this site's folder (docs/data-format.md)")
    add_optional(p, "--steps", int, help="inner steps (default: the checkpoint's eval.steps)")
    p.add_argument(
        "--compare",
        metavar="FILE",
        default=None,
        help="another checkpoint to adapt from on the same episodes (e.g. FedAvg-trained)",
    )
    add_optional(
        p, "--shots", int,
        help="support examples per task, per class for classification (default: the checkpoint's task.shots)",
    )  # fmt: skip
    add_optional(
        p, "--query", int,
        help="query examples per task, per class for classification (default: the checkpoint's task.query)",
    )  # fmt: skip
    add_optional(
        p,
        "--ways",
        int,
        help="classes per episode (default: the checkpoint's task.ways; another number needs an ANIL checkpoint with "
        "meta.head_init prototypes or zero, whose head is rebuilt for each support set)",
    )
    p.add_argument(
        "--episodes", type=int, default=20, help="support/query draws per task for the 95%% intervals (default 20)"
    )
    p.add_argument(
        "--split",
        choices=("tasks", "heldout"),
        default="tasks",
        help="which folder of the site to adapt to (default tasks/)",
    )
    p.add_argument("--seed", type=int, default=0, help="seeds the episodes and the random-initialization baseline")
    p.add_argument("--no-save", action="store_true", help="do not write personalized models")
    p.add_argument("--json", action="store_true", help="print the aggregate results as JSON instead of the summary")
    p.add_argument("--out", metavar="DIR", help="output folder (default: runs/adapt-<site folder name>)")
    add_common(p, out=False, overrides=False)

    p = add_command(
        subparsers,
        "predict",
        cmd_predict,
        help="predict with the personalized models written by `fedmeta adapt`",
        description="Load personalized models (tensor-only files + manifest.json) and predict for new inputs.",
    )
    p.add_argument(
        "--models", required=True, metavar="DIR", help="the `fedmeta adapt` output folder (or its models/ folder)"
    )
    p.add_argument("--task", default=None, help="which task's model (optional when only one task was personalized)")
    p.add_argument(
        "--input", required=True, metavar="FILE", help="an .npz with array x, an .npy, an image, or a folder of images"
    )
    p.add_argument(
        "--out", metavar="FILE", default=None, help="write predictions to FILE (.npz or .json) instead of printing JSON"
    )
    p.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    p.add_argument("--quiet", action="store_true", help="warnings only")
