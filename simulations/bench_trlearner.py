"""TRLearner benchmark (issue 18): base algorithms with and without the task-relation term.

For every (task family, shots, algorithm) it first chooses TRLearner's weight ``λ`` on
*validation* tasks (drawn from their own stream, never the held-out ones) with one selection
seed, then trains the base algorithm and TRLearner(λ*) with each training seed and evaluates
both on 600 held-out tasks and on 600 out-of-distribution tasks (sinusoid amplitudes, harmonic
frequencies above the training range). Runs are ``fedmeta centralized`` (the same round loop as
the federation) with one client per meta-batch of ``meta.tasks_per_client`` tasks.

Every finished run is appended to the raw record (JSON lines, ``docs/results/trlearner/runs.jsonl``
by default) as soon as it ends, and runs already in the record are skipped, so the record
accumulates across sessions; ``--render`` rewrites the ``trlearner`` section of
``docs/benchmarks.md`` from the record alone::

    python simulations/bench_trlearner.py --tasks sinusoid --shots 5 --algorithms maml --iterations 1000
    python simulations/bench_trlearner.py --render
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedmeta.centralized import run_centralized  # noqa: E402
from fedmeta.config import Config, config_from_dict, to_dict  # noqa: E402
from fedmeta.evaluation import evaluate  # noqa: E402
from fedmeta.experiment import Experiment  # noqa: E402
from fedmeta.rng import make_generator  # noqa: E402
from fedmeta.tasks import TaskSource  # noqa: E402
from simulations.report import machine_line, update_section  # noqa: E402

__all__ = ["bench_config", "main"]

RECORD = ROOT / "docs" / "results" / "trlearner" / "runs.jsonl"
#: Out-of-distribution ranges: above the training range of the family's varying parameter.
OOD = {"sinusoid": {"amplitude": [5.0, 7.0]}, "harmonic": {"omega": [2.0, 3.0]}}
TRAINED = {"sinusoid": "amplitude in [0.1, 5]", "harmonic": "omega in [0.5, 2]"}
EVAL_TASKS = 600
VALIDATION_TASKS = 300
STEPS = 10


def bench_config(task: str, shots: int, algorithm: str, *, seed: int, iterations: int, weight: float,
                 heads: int, form: str) -> Config:
    """The run: MAML's sinusoid recipe (one inner step of 0.01, Adam 1e-3, meta-batch 5 tasks)."""
    meta: dict[str, Any] = {
        "algorithm": algorithm,
        "inner_lr": 0.01,
        "inner_steps": 1,
        "outer_optimizer": "adam",
        "outer_lr": 0.001,
        "tasks_per_client": 5,
    }
    if weight > 0:
        meta |= {"regularizer": "trlearner", "trlearner": {"weight": weight, "heads": heads, "form": form}}
    return config_from_dict({
        "seed": seed,
        "task": {"name": task, "shots": shots, "query": 10},
        "model": {"name": "mlp", "hidden": [40, 40]},
        "meta": meta,
        "federation": {"clients_total": 1000, "clients_per_round": 1, "rounds": iterations},
        "eval": {"tasks": 10, "every": iterations, "steps": STEPS},
    })


def _tasks(cfg: Config, *, stream: str, n: int, ood: bool = False) -> Any:
    """``n`` evaluation tasks: the held-out stream (``eval``), or a validation stream of their own."""
    data = to_dict(cfg)
    if ood:
        data["task"] |= OOD[cfg.task.name]
    source = TaskSource(config_from_dict(data))
    if stream == "eval":
        return source.eval_tasks(n)
    return source.family(None).sample(make_generator(cfg.seed, "trlearner-bench", stream), n, "eval")


def _score(exp: Experiment, meta: dict[str, torch.Tensor], tasks: Any) -> tuple[float, float]:
    losses = evaluate(exp.algorithm, meta, tasks, steps=STEPS).loss[:, -1].double()
    return float(losses.mean()), float(1.96 * losses.std() / math.sqrt(losses.numel()))


def train_and_score(cfg: Config, *, split: str) -> dict[str, Any]:
    """Train ``cfg`` centrally, then score the final meta-parameters (validation, or held-out and OOD)."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_centralized(cfg, Path(out) / "run")
        wall = time.perf_counter() - start
        state = torch.load(Path(out) / "run" / "checkpoint.pt", weights_only=True)
        rounds = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    meta = state["meta_params"]
    exp = Experiment(cfg)
    # one iteration: the clients' meta-gradients and the server step (no evaluation, no checkpoint)
    per_iter = [r["timing"]["clients"] + r["timing"].get("aggregate", 0.0) for r in rounds if r["round"] >= 1]
    row: dict[str, Any] = {"sec_per_iter": sum(per_iter) / len(per_iter), "wall_s": wall}
    if split == "validation":
        row["val_mse"], row["val_ci95"] = _score(exp, meta, _tasks(cfg, stream="validation", n=VALIDATION_TASKS))
    else:
        row["heldout_mse"], row["heldout_ci95"] = _score(exp, meta, _tasks(cfg, stream="eval", n=EVAL_TASKS))
        row["ood_mse"], row["ood_ci95"] = _score(exp, meta, _tasks(cfg, stream="eval", n=EVAL_TASKS, ood=True))
    return row


def _read(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines() if line.strip()]


_KEY = ("kind", "task", "shots", "algorithm", "weight", "heads", "form", "seed", "iterations")


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in _KEY)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args: argparse.Namespace) -> None:
    """Selection then final runs, appending each to the record as it ends (skipping recorded ones)."""
    record = Path(args.record)
    record.parent.mkdir(parents=True, exist_ok=True)
    done = {_key(r) for r in _read(record)}
    commit = _commit()

    def one(kind: str, task: str, shots: int, algorithm: str, weight: float, seed: int) -> dict[str, Any] | None:
        base = {"kind": kind, "task": task, "shots": shots, "algorithm": algorithm, "weight": weight,
                "heads": args.heads if weight > 0 else 0, "form": args.form if weight > 0 else "none",
                "seed": seed, "iterations": args.iterations}
        if _key(base) in done:
            return next(r for r in _read(record) if _key(r) == _key(base))
        cfg = bench_config(task, shots, algorithm, seed=seed, iterations=args.iterations, weight=weight,
                           heads=args.heads, form=args.form)
        row = base | train_and_score(cfg, split="validation" if kind == "select" else "test") | {"commit": commit}
        with record.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    for task in args.tasks:
        for shots in args.shots:
            for algorithm in args.algorithms:
                scores = {w: one("select", task, shots, algorithm, w, args.select_seed) for w in args.weights}
                best = min(args.weights, key=lambda w: scores[w]["val_mse"])  # type: ignore[index]
                for seed in args.seeds:
                    one("final", task, shots, algorithm, 0.0, seed)
                    one("final", task, shots, algorithm, best, seed)


def _pooled(rows: Iterable[dict[str, Any]], key: str) -> tuple[float, float, int]:
    """Mean over seeds and the 95% interval of that mean, pooled from each seed's own interval.

    Each seed's mean over 600 tasks has standard error ``ci95/1.96``; the seeds' means are averaged
    with the seeds' spread added (so a seed-to-seed difference widens the interval).
    """
    rows = list(rows)
    means = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    within = torch.tensor([(r[key.replace("mse", "ci95")] / 1.96) ** 2 for r in rows], dtype=torch.float64)
    n = len(rows)
    between = float(means.var(unbiased=True)) if n > 1 else 0.0
    se = math.sqrt(float(within.mean()) / n + between / n)
    return float(means.mean()), 1.96 * se, n


def render(record: Path) -> str:
    """The benchmarks section, from the record alone."""
    rows = _read(record)
    shown = record.resolve().relative_to(ROOT) if record.resolve().is_relative_to(ROOT) else record
    finals = [r for r in rows if r["kind"] == "final"]
    lines = [
        "## TRLearner (`simulations/bench_trlearner.py`)",
        "",
        f"Rendered from the committed raw record `{shown}` (one JSON line per run; rerun the "
        "script to add runs, `--render` to redraw this section). TRLearner here is our reconstruction "
        "(docs/trlearner.md); the paper's numbers are not quoted. Centralized meta-training, one client per "
        "meta-batch of 5 tasks, MLP 40-40, one inner step of 0.01, Adam 1e-3; held-out MSE after "
        f"{STEPS} steps on {EVAL_TASKS} tasks per seed, mean over training seeds with a 95% interval (within-seed "
        f"task spread and between-seed spread); OOD: {EVAL_TASKS} tasks outside the training range "
        f"({', '.join(f'{t}: {TRAINED[t]}, OOD {next(iter(OOD[t]))} {next(iter(OOD[t].values()))}' for t in OOD)}). "
        "λ chosen on validation tasks (their own stream, one selection seed), never on the held-out ones.",
        "",
        "| task | shots | algorithm | iterations | seeds | λ (heads, form) | held-out MSE base | "
        "held-out MSE TRLearner | OOD MSE base | OOD MSE TRLearner | s/iter base | s/iter TRLearner |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    diverged: set[str] = set()
    groups: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for r in finals:
        groups.setdefault((r["task"], r["shots"], r["algorithm"], r["iterations"]), []).append(r)
    for (task, shots, algorithm, iterations), rs in sorted(groups.items()):
        base = [r for r in rs if r["weight"] == 0]
        trl = [r for r in rs if r["weight"] > 0]
        if not base or not trl:
            continue
        seeds = sorted({r["seed"] for r in base} & {r["seed"] for r in trl})
        base = [r for r in base if r["seed"] in seeds]
        trl = [r for r in trl if r["seed"] in seeds]

        def cell(rows: list[dict[str, Any]], key: str) -> str:
            finite = [r for r in rows if math.isfinite(r[key])]
            if not finite:
                return "diverged"
            mean, ci, _ = _pooled(finite, key)
            if len(finite) < len(rows):
                diverged.add(key)
                return f"{mean:.3f} ± {ci:.3f} ({len(finite)} of {len(rows)} seeds†)"
            return f"{mean:.3f} ± {ci:.3f}"

        sec = {name: sum(r["sec_per_iter"] for r in group) / len(group) for name, group in (("b", base), ("t", trl))}
        lines.append(
            f"| {task} | {shots} | {algorithm} | {iterations} | {len(seeds)} | {trl[0]['weight']:g} "
            f"({trl[0]['heads']}, {trl[0]['form']}) | {cell(base, 'heldout_mse')} | {cell(trl, 'heldout_mse')} | "
            f"{cell(base, 'ood_mse')} | {cell(trl, 'ood_mse')} | {sec['b']:.4f} | {sec['t']:.4f} |"
        )
    if diverged:
        lines += ["", "† a seed's adaptation diverged (a NaN loss after the test-time steps on some tasks); "
                  "the cell averages the seeds that stayed finite. The raw record keeps the NaN."]
    selects = [r for r in rows if r["kind"] == "select"]
    if selects:
        lines += ["", "Validation MSE of the λ grid (selection seed):", ""]
        lines += ["| task | shots | algorithm | iterations | λ | validation MSE |", "|---|---|---|---|---|---|"]
        for r in sorted(selects, key=lambda r: (r["task"], r["shots"], r["algorithm"], r["iterations"], r["weight"])):
            lines.append(f"| {r['task']} | {r['shots']} | {r['algorithm']} | {r['iterations']} | {r['weight']:g} | "
                         f"{r['val_mse']:.3f} ± {r['val_ci95']:.3f} |")
    if not finals:
        lines += ["", "*No final runs in the record yet: the λ selection above is all that has run (the results "
                  "table is empty). Nothing here shows whether TRLearner helps.*"]
    lines += ["", f"Machine of the latest render: {machine_line()}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the benchmark (or only ``--render`` its section)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["sinusoid", "harmonic"], choices=sorted(OOD))
    p.add_argument("--shots", nargs="+", type=int, default=[5, 10])
    p.add_argument("--algorithms", nargs="+", default=["maml", "metasgd", "anil"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--select-seed", type=int, default=100)
    p.add_argument("--weights", nargs="+", type=float, default=[0.03, 0.1, 0.3, 1.0], help="the λ grid")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--form", default="agreement")
    p.add_argument("--iterations", type=int, default=2000)
    p.add_argument("--record", default=str(RECORD))
    p.add_argument("--render", action="store_true", help="only rewrite the docs section from the record")
    args = p.parse_args(argv)
    if not args.render:
        run(args)
    update_section("trlearner", render(Path(args.record)))


if __name__ == "__main__":
    main()
