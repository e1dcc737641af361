"""Benchmark: what a new site gains from the published meta-initialization.

For each family (sinusoid regression; glyphs 5-way 1-shot classification) this script
meta-trains an initialization with the centralized reference, trains a plain FedAvg
initialization on the same tasks for the same number of rounds, writes a new site that took no
part in training (``make-data`` with another seed; for glyphs, tasks from the held-out
evaluation scripts), and runs ``fedmeta adapt``'s library call on it with ``--compare``. It
reports post-adaptation query metrics from the meta-initialization, a random initialization and
the FedAvg initialization side by side (same episodes), and how long the adaptation takes.
Everything is measured in this run and written to the ``new-site`` section of
``docs/benchmarks.md``.

    nice -n 10 .venv/bin/python -m simulations.bench_new_site            # both families
    nice -n 10 .venv/bin/python -m simulations.bench_new_site --only sinusoid
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from fedmeta.adaptation import adapt_site
from fedmeta.centralized import run_centralized
from fedmeta.config import Config, load_config
from fedmeta.datagen import make_sites
from simulations.report import machine_line, save_record, update_section

log = logging.getLogger("bench_new_site")

REPO = Path(__file__).resolve().parents[1]
SECTION = "new-site"


def _train(cfg: Config, out: Path, algorithm: str) -> tuple[Path, float]:
    cfg = replace(cfg, meta=replace(cfg.meta, algorithm=algorithm))
    t0 = time.perf_counter()
    run_centralized(cfg, out / algorithm)
    return out / algorithm / "checkpoint.pt", time.perf_counter() - t0


def run_family(
    name: str,
    cfg: Config,
    out: Path,
    *,
    site_seed: int,
    split: str,
    tasks: int,
    heldout: int,
    episodes: int,
    steps: int,
    reuse: bool = False,
) -> dict[str, Any]:
    """Train meta and FedAvg initializations, write a fresh site, adapt, and collect the numbers.

    With ``reuse``, the measurements an earlier run of this script stored in ``out/bench.json``
    are read back instead (to re-render the tables without retraining).
    """
    if reuse and (out / "bench.json").exists():
        log.info("%s: reusing the measurements in %s", name, out / "bench.json")
        return json.loads((out / "bench.json").read_text())
    out.mkdir(parents=True, exist_ok=True)
    meta_ckpt, meta_s = _train(cfg, out, cfg.meta.algorithm)
    fedavg_ckpt, fedavg_s = _train(cfg, out, "fedavg")
    site_cfg = replace(cfg, seed=site_seed)
    site = make_sites(site_cfg, 1, out / "sites", tasks_per_site=tasks, heldout_per_site=heldout)[0]
    report = adapt_site(
        meta_ckpt,
        site,
        out / "adapted",
        steps=steps,
        episodes=episodes,
        split=split,
        compare=fedavg_ckpt,
        seed=site_seed,
    )
    report["training_seconds"] = {"meta": meta_s, "fedavg": fedavg_s}
    report["load_average_after"] = os.getloadavg()[0]
    (out / "bench.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


def _fmt(agg: dict[str, Any], key: str) -> str:
    return f"{agg[key]:.3f} ± {agg[key + '_ci95']:.3f}"


def family_markdown(title: str, cfg: Config, report: dict[str, Any]) -> str:
    """One family's table: before / after 1 step / after all steps for each initialization."""
    s = report["settings"]
    cls = report["site"]["kind"] == "classification"
    metric = "accuracy" if cls else "loss"
    lines = [
        f"### {title}",
        "",
        f"Meta-training: `{cfg.meta.algorithm}` on `{cfg.model.name}`"
        + (f" ({cfg.model.channels} filters)" if cfg.model.name == "conv4" else "")
        + f", {cfg.federation.rounds} rounds × {cfg.federation.clients_per_round * cfg.meta.tasks_per_client} "
        f"tasks, inner lr {cfg.meta.inner_lr}, outer Adam {cfg.meta.outer_lr} (centralized reference, "
        f"{report['training_seconds']['meta']:.0f} s); FedAvg: same rounds and tasks "
        f"({report['training_seconds']['fedavg']:.0f} s). New site: {len(report['site']['tasks'])} tasks from "
        f"`{report['site']['folder']}/` written with another seed"
        + (" (held-out evaluation scripts)" if cls else "")
        + f"; {s['episodes']} support/query episodes per task, "
        + (
            f"{s['ways']}-way {s['shots']}-shot, {s['query']} query per class"
            if cls
            else f"K = {s['shots']} support, {s['query']} query"
        )
        + f", {s['steps']} inner steps. Query {metric}, mean ± 95% interval (stratified over tasks).",
        "",
        f"| initialization | {metric} before | after 1 step | after {s['steps']} steps |"
        + (" loss after |" if cls else ""),
        "| --- | --- | --- | --- |" + (" --- |" if cls else ""),
    ]
    names = {
        "meta": f"meta-initialization ({cfg.meta.algorithm})",
        "random": "random initialization",
        "compare": "FedAvg initialization",
    }
    for label in ("meta", "random", "compare"):
        agg = report["initializations"][label]["aggregate"]
        curve, ci = agg[f"{metric}_curve"], agg[f"{metric}_curve_ci95"]
        row = (
            f"| {names[label]} | {_fmt(agg, f'pre_adapt_{metric}')} | {curve[1]:.3f} ± {ci[1]:.3f} | "
            f"{_fmt(agg, f'post_adapt_{metric}')} |"
        )
        if cls:
            row += f" {_fmt(agg, 'post_adapt_loss')} |"
        lines.append(row)
    meta = report["initializations"]["meta"]
    per = meta["seconds"] / max(1, meta["adaptations"])
    pers = report["personalized"]
    lines += [
        "",
        f"Adaptation time: {meta['adaptations']} episodes ({s['steps']} steps each, vectorized with `vmap`) in "
        f"{meta['seconds']:.2f} s, {1000 * per:.2f} ms per episode; one personalized model "
        f"({s['steps']} steps on all of a task's examples, unbatched, what a site runs to keep a model): median "
        f"{1000 * (pers.get('seconds_per_task_median') or 0):.1f} ms. Whole `adapt` call: {report['wall_seconds']:.1f} "
        "s. "
        + (
            f"1-minute load average when this family finished: {report['load_average_after']:.1f}."
            if "load_average_after" in report
            else "The machine was shared with other jobs during this family's run (load average 2-9; not recorded): "
            "its wall times are upper bounds."
        ),
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its section of ``docs/benchmarks.md``."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/bench-new-site", help="working folder")
    ap.add_argument("--only", choices=("sinusoid", "glyphs"), default=None)
    ap.add_argument("--sinusoid-rounds", type=int, default=3000)
    ap.add_argument("--glyph-rounds", type=int, default=300)
    ap.add_argument("--glyph-channels", type=int, default=32, help="Conv-4 filters (configs/glyphs.yaml: 64)")
    ap.add_argument(
        "--glyph-clients", type=int, default=4, help="clients per round, 4 tasks each (configs/glyphs.yaml: 8)"
    )
    ap.add_argument("--episodes", type=int, default=20)
    ap.add_argument("--no-write", action="store_true", help="print the markdown instead of updating docs/benchmarks.md")
    ap.add_argument(
        "--reuse", action="store_true", help="re-render from the measurements stored in --out by an earlier run"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    out = Path(args.out)
    parts: list[str] = []
    if args.only in (None, "sinusoid"):
        cfg = load_config(
            REPO / "configs" / "sinusoid.yaml",
            [f"federation.rounds={args.sinusoid_rounds}", f"eval.every={args.sinusoid_rounds}", "eval.tasks=100"],
        )
        rep = run_family(
            "sinusoid",
            cfg,
            out / "sinusoid",
            site_seed=101,
            split="tasks",
            tasks=20,
            heldout=0,
            episodes=args.episodes,
            steps=10,
            reuse=args.reuse,
        )
        (out / "sinusoid" / "section.md").write_text(
            family_markdown("Sinusoid regression (MAML's benchmark)", cfg, rep)
        )
    if args.only in (None, "glyphs"):
        glyph_cfg = REPO / "configs" / "glyphs.yaml"
        if glyph_cfg.exists():
            cfg = load_config(
                glyph_cfg,
                [
                    "task.ways=5",
                    "task.shots=1",
                    f"federation.rounds={args.glyph_rounds}",
                    f"eval.every={args.glyph_rounds}",
                    "eval.tasks=100",
                    f"model.channels={args.glyph_channels}",
                    f"federation.clients_per_round={args.glyph_clients}",
                    "meta.tasks_per_client=4",
                ],
            )
            rep = run_family(
                "glyphs",
                cfg,
                out / "glyphs",
                site_seed=101,
                split="heldout",
                tasks=2,
                heldout=20,
                episodes=args.episodes,
                steps=cfg.eval.steps,
                reuse=args.reuse,
            )
            (out / "glyphs" / "section.md").write_text(
                family_markdown("Glyphs 5-way 1-shot (Conv-4, held-out scripts)", cfg, rep)
            )
    # each family's table is kept in the working folder, so `--only` refreshes one and keeps the other
    for family in ("sinusoid", "glyphs"):
        f = out / family / "section.md"
        parts.append(f.read_text() if f.exists() else f"### {family}\n\nNot run yet (`--only {family}`).")
    body = (
        "## A new site adapts the published initialization (`simulations/bench_new_site.py`)\n\n"
        f"Machine: {machine_line()}.\n\n" + "\n\n".join(parts)
    )
    if args.no_write:
        print(body)
    else:
        # the raw measurements each family's table is rendered from (committed next to the section)
        for family in ("sinusoid", "glyphs"):
            if (out / family / "bench.json").exists():
                save_record(SECTION, family, json.loads((out / family / "bench.json").read_text()))
        update_section(SECTION, body)
        print(f"wrote section '{SECTION}' of docs/benchmarks.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
