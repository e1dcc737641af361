"""``fedmeta privacy CONFIG``: the (epsilon, delta) a config would spend, without training.

Also calibrates the noise multiplier for a target epsilon (``--calibrate``) and, when
``privacy.target_epsilon`` is set, says how many rounds fit and what a run would do about it.
Everything is computed with Opacus' accountants through :mod:`fedmeta.privacy`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable
from typing import Any

from fedmeta.cli.common import add_command, add_optional

__all__ = ["register", "cmd_privacy", "privacy_report"]


def _pool_size(cfg: Any, given: int | None) -> int | None:
    """Task mode: ``--pool-size`` if given; otherwise the config's public ``task.tasks_per_site`` applies.

    Sites' own task counts are never read: under task-level DP the sample rate comes from the
    public config only.
    """
    return given


def privacy_report(
    cfg: Any, *, calibrate: bool = False, target_epsilon: float | None = None, pool_size: int | None = None
) -> dict[str, Any]:
    """The JSON object ``fedmeta privacy --json`` prints for ``cfg``.

    Raises:
        ConfigError: for ``--calibrate`` without a target or without DP, or a target that no
            noise multiplier reaches.
    """
    from fedmeta.errors import ConfigError
    from fedmeta.privacy import calibrate_config_noise_multiplier, plan_privacy
    from fedmeta.privacy.mechanisms import mechanism_for

    mechanism = mechanism_for(cfg)
    pool = _pool_size(cfg, pool_size)
    plan = plan_privacy(cfg, pool_size=pool)
    out = plan.to_dict()
    out["pool_size"] = pool if pool is not None else (cfg.task.tasks_per_site if mechanism.counts_site_pools else None)
    out["on_budget"] = cfg.privacy.on_budget
    if plan.within_budget:
        out["rounds_to_run"] = plan.rounds
        out["refuses_to_start"] = False
    else:
        stop = cfg.privacy.on_budget == "stop" and bool(plan.rounds_that_fit)
        out["rounds_to_run"] = plan.rounds_that_fit if stop else 0
        out["refuses_to_start"] = not stop
    if calibrate:
        target = target_epsilon if target_epsilon is not None else cfg.privacy.target_epsilon
        if not mechanism.enabled:
            raise ConfigError("--calibrate needs a privacy mode: privacy.mode is 'none'")
        if target is None:
            raise ConfigError("--calibrate needs a target: set privacy.target_epsilon or pass --target-epsilon")
        try:
            sigma = calibrate_config_noise_multiplier(cfg, target_epsilon=target, pool_size=pool)
        except ValueError as exc:
            raise ConfigError(f"cannot calibrate privacy.noise_multiplier for epsilon {target:g}: {exc}") from exc
        out["calibration"] = {"target_epsilon": target, "noise_multiplier": sigma, "rounds": plan.rounds}
    return out


def _human(report: dict[str, Any], config: str) -> str:
    from fedmeta.privacy.mechanisms import mechanism_for

    mechanism = mechanism_for(str(report["mode"]))
    lines = [f"{config}: privacy.mode {report['mode']}"]
    if not mechanism.enabled:
        lines.append("  no differential privacy: nothing is clipped or noised (epsilon is unbounded)")
        return "\n".join(lines)
    eps = "unbounded (noise_multiplier 0)" if report["epsilon_unbounded"] else f"{report['epsilon']:.4f}"
    lines += [
        f"  protects:        {report['protects']}",
        f"  noise added by:  {report['noise_added_by']}",
        f"  sample rate:     {report['sample_rate']:.6g} = {report['sample_rate_means']}",
        f"  accountant:      {report['accountant']} (Opacus), noise_multiplier {report['noise_multiplier']:g}"
        + (
            f" (accounted as {report['accounted_noise_multiplier']:.6g})"
            if not math.isclose(report["accounted_noise_multiplier"], report["noise_multiplier"])
            else ""
        )
        + f", clip_norm {report['clip_norm']:g}",
        f"  spends:          epsilon = {eps} at delta = {report['delta']:g} after {report['rounds']} rounds"
        + (" (a client or site taking part in every round)" if mechanism.per_participant_accounting else ""),
    ]
    if report["target_epsilon"] is not None:
        if report["within_budget"]:
            lines.append(f"  budget:          within target epsilon {report['target_epsilon']:g}")
        else:
            action = (
                f"the run would stop cleanly after round {report['rounds_to_run']}"
                if not report["refuses_to_start"]
                else "the run would refuse to start (privacy.on_budget: stop would cut it)"
                if report["rounds_that_fit"]
                else "the run would refuse to start"
            )
            lines.append(
                f"  budget:          EXCEEDS target epsilon {report['target_epsilon']:g}: only "
                f"{report['rounds_that_fit']} of {report['rounds']} rounds fit; {action}"
            )
    cal = report.get("calibration")
    if cal:
        lines.append(
            f"  calibrated:      noise_multiplier {cal['noise_multiplier']:.6g} spends at most epsilon "
            f"{cal['target_epsilon']:g} over {cal['rounds']} rounds"
        )
    return "\n".join(lines)


def cmd_privacy(args: argparse.Namespace) -> int:
    """Run ``fedmeta privacy``."""
    from fedmeta.config import load_config

    cfg = load_config(args.config, args.overrides)
    report = privacy_report(cfg, calibrate=args.calibrate, target_epsilon=args.target_epsilon, pool_size=args.pool_size)
    if args.json:
        out = {"config": str(args.config), **report}
        print(json.dumps(out, sort_keys=True), file=sys.stdout)
    else:
        print(_human(report, str(args.config)), file=sys.stdout)
    return 0


def register(subparsers: Any, add_common: Callable[..., None]) -> None:
    """Add ``fedmeta privacy`` to the CLI."""
    p = add_command(
        subparsers,
        "privacy",
        cmd_privacy,
        help="print the (epsilon, delta) a config would spend, without training",
        description="Print the (epsilon, delta) a config would spend (Opacus accountants), how many "
        "rounds fit a target epsilon, and optionally the noise multiplier that meets it.",
    )
    p.add_argument("config", help="YAML config file")
    p.add_argument("--json", action="store_true", help="print one JSON object (keys include epsilon and delta)")
    p.add_argument(
        "--calibrate", action="store_true", help="also find the noise_multiplier that spends at most the target epsilon"
    )
    add_optional(
        p, "--target-epsilon", float, metavar="E", help="target for --calibrate (default: privacy.target_epsilon)"
    )
    add_optional(
        p, "--pool-size", int, metavar="N",
        help="task mode: tasks per site (default: task.tasks_per_site or counted from task.data_dir)",
    )  # fmt: skip
    add_common(p, out=False)
