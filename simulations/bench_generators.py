"""Constraint-generator ablation (issue 17): none / direct / adversarial virtual tasks on a narrow federation.

Protocol (TR-MAML's narrow-range one): 8 clients whose sinusoid tasks have amplitudes in
``[0.1, 1.05]``; the learned initialization is evaluated on 600 held-out tasks with amplitudes in
``[0.1, 5.0]`` (``eval.task``), after 10 adaptation steps. Arms:

* ``none``: plain federated MAML;
* ``direct``: virtual tasks sampled uniformly from the *prior box* (amplitude ``[0.1, 8]``: the
  family's form and an output bound of 8, wider than the held-out range, which neither arm is told);
* ``adversarial``: the generator in the same prior box, with the output bound as a ``bounded``
  constraint (``fedmeta/generators/adversarial.py``);
* ``direct-full``: direct told the held-out range ``[0.1, 5]`` itself: the upper reference, not a
  fair arm.

``λ`` (``generators.weight``) is chosen for each generator arm on 300 *validation* tasks (their own
stream, the held-out range, one selection seed), never on the 600 held-out ones; then every arm
trains with each training seed. Reported per arm: mean held-out MSE over seeds (95% interval from
the within-seed task spread and the between-seed spread), the worst-10% tail (mean of the worst
tenth of tasks), MSE inside the clients' band (600 tasks with amplitude in ``[0.1, 1.05]``), MSE by
amplitude bin (figure), and seconds per round (clients + server stages, evaluation rounds excluded;
side by side in one run). Runs are ``fedmeta centralized``: the same round loop as the federation.

Every finished run is appended to the raw record (``docs/results/generators/runs.jsonl``) as it
ends and recorded runs are skipped, so the record accumulates across sessions; ``--render``
rewrites the ``generators`` section of ``docs/benchmarks.md`` and the figure from the record alone::

    nice -n 10 python -m simulations.bench_generators --seeds 0 1 2 --rounds 1500
    python -m simulations.bench_generators --render
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import subprocess
import sys
import tempfile
import time
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

__all__ = ["ARMS", "arm_config", "main"]

RECORD = ROOT / "docs" / "results" / "generators" / "runs.jsonl"
FIGURE = ROOT / "docs" / "figures" / "generators-by-amplitude.png"
BAND = [0.1, 1.05]  # the clients' amplitudes
HELDOUT = [0.1, 5.0]  # the held-out amplitudes
PRIOR = [0.1, 8.0]  # what the generator arms are told: the family's form and an output bound of 8
BINS = [0.1, 1.05, 2.0, 3.0, 4.0, 5.0]
EVAL_TASKS = 600
VALIDATION_TASKS = 300
STEPS = 10
ARMS = ("none", "direct", "adversarial", "direct-full")


def arm_config(arm: str, *, seed: int, rounds: int, weight: float) -> Config:
    """The run of one arm: 8 clients, all in every round, 5 tasks each, MAML's sinusoid recipe."""
    data: dict[str, Any] = {
        "seed": seed,
        "task": {"name": "sinusoid", "shots": 10, "query": 10, "amplitude": BAND},
        "model": {"name": "mlp", "hidden": [40, 40]},
        "meta": {"algorithm": "maml", "inner_lr": 0.01, "inner_steps": 1, "outer_optimizer": "adam",
                 "outer_lr": 0.001, "tasks_per_client": 5},
        "federation": {"clients_total": 8, "clients_per_round": 8, "rounds": rounds},
        "eval": {"tasks": 10, "every": rounds, "steps": STEPS, "task": {"amplitude": HELDOUT}},
    }
    if arm != "none":
        gen: dict[str, Any] = {"mode": "direct", "depth": 2, "weight": weight, "tasks": 25,
                               "family": {"amplitude": HELDOUT if arm == "direct-full" else PRIOR}}
        if arm == "adversarial":
            gen |= {"mode": "adversarial", "constraints": [{"kind": "bounded", "bound": PRIOR[1], "weight": 1.0}]}
        data["generators"] = gen
    return config_from_dict(data)


def _tasks(cfg: Config, *, amplitude: list[float], stream: str, n: int) -> Any:
    """``n`` evaluation tasks with amplitudes in ``amplitude`` from the held-out stream or a stream of their own."""
    data = to_dict(cfg)
    data["task"]["amplitude"] = amplitude
    data["eval"]["task"] = {}  # the amplitudes asked for, not eval.task's
    data.pop("generators", None)
    source = TaskSource(config_from_dict(data))
    if stream == "eval":
        return source.eval_tasks(n)
    return source.family(None).sample(make_generator(cfg.seed, "generators-bench", stream), n, "eval")


def _losses(exp: Experiment, meta: dict[str, torch.Tensor], tasks: Any) -> torch.Tensor:
    return evaluate(exp.algorithm, meta, tasks, steps=STEPS).loss[:, -1].double()


def _mean_ci(losses: torch.Tensor) -> tuple[float, float]:
    return float(losses.mean()), float(1.96 * losses.std() / math.sqrt(losses.numel()))


def train_and_score(cfg: Config, *, split: str) -> dict[str, Any]:
    """Train ``cfg`` centrally, then score its initialization on validation or on held-out and in-band tasks."""
    with tempfile.TemporaryDirectory() as out:
        start = time.perf_counter()
        run_centralized(cfg, Path(out) / "run")
        wall = time.perf_counter() - start
        state = torch.load(Path(out) / "run" / "checkpoint.pt", weights_only=True)
        rounds = [json.loads(line) for line in (Path(out) / "run" / "metrics.jsonl").read_text().splitlines()]
    meta, exp = state["meta_params"], Experiment(cfg)
    per_round = [r["seconds"] for r in rounds if r["round"] >= 1 and "eval" not in r and "seconds" in r]
    gens = [r["generators"] for r in rounds if "generators" in r]
    row: dict[str, Any] = {"sec_per_round": sum(per_round) / max(1, len(per_round)), "wall_s": wall}
    if gens:
        row["failures"] = sum(bool(g["failures"]) for g in gens)
        row["mixed_rounds"] = sum(g["weight"] > 0 for g in gens)
    if split == "validation":
        row["val_mse"], row["val_ci95"] = _mean_ci(_losses(exp, meta, _tasks(cfg, amplitude=HELDOUT,
                                                                              stream="validation", n=VALIDATION_TASKS)))
        return row
    held = _tasks(cfg, amplitude=HELDOUT, stream="eval", n=EVAL_TASKS)
    losses = _losses(exp, meta, held)
    row["heldout_mse"], row["heldout_ci95"] = _mean_ci(losses)
    worst = torch.sort(losses, descending=True).values[: EVAL_TASKS // 10]
    row["worst10_mse"] = float(worst.mean())
    amp = held.params[:, 0].double()
    row["bins"] = [float(losses[(amp >= lo) & (amp < hi)].mean()) for lo, hi in itertools.pairwise(BINS)]
    row["band_mse"], row["band_ci95"] = _mean_ci(_losses(exp, meta, _tasks(cfg, amplitude=BAND, stream="eval",
                                                                           n=EVAL_TASKS)))
    return row


def _read(record: Path) -> list[dict[str, Any]]:
    if not record.exists():
        return []
    return [json.loads(line) for line in record.read_text(encoding="utf-8").splitlines() if line.strip()]


_KEY = ("kind", "arm", "weight", "seed", "rounds")


def _key(row: dict[str, Any]) -> tuple[Any, ...]:
    return tuple(row[k] for k in _KEY)


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run(args: argparse.Namespace) -> None:
    """λ selection, then every arm and seed, appending each run to the record as it ends."""
    record = Path(args.record)
    record.parent.mkdir(parents=True, exist_ok=True)
    commit = _commit()

    def one(kind: str, arm: str, weight: float, seed: int) -> dict[str, Any]:
        base = {"kind": kind, "arm": arm, "weight": weight, "seed": seed, "rounds": args.rounds}
        for r in _read(record):
            if _key(r) == _key(base):
                return r
        cfg = arm_config(arm, seed=seed, rounds=args.rounds, weight=weight)
        row = base | train_and_score(cfg, split="validation" if kind == "select" else "test") | {"commit": commit}
        with record.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    chosen = {"none": 0.0}
    for arm in [a for a in args.arms if a != "none"]:
        scores = {w: one("select", arm, w, args.select_seed)["val_mse"] for w in args.weights}
        chosen[arm] = min(scores, key=lambda w: scores[w])
    for seed in args.seeds:
        for arm in args.arms:
            one("final", arm, chosen[arm], seed)


def _pooled(rows: list[dict[str, Any]], key: str) -> tuple[float, float]:
    """Mean over seeds and the 95% interval of that mean (within-seed task spread plus between-seed spread)."""
    means = torch.tensor([r[key] for r in rows], dtype=torch.float64)
    within = torch.tensor([(r[key.replace("mse", "ci95")] / 1.96) ** 2 for r in rows], dtype=torch.float64)
    n = len(rows)
    between = float(means.var(unbiased=True)) if n > 1 else 0.0
    return float(means.mean()), 1.96 * math.sqrt(float(within.mean()) / n + between / n)


def _figure(groups: dict[str, list[dict[str, Any]]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    centres = [(lo + hi) / 2 for lo, hi in itertools.pairwise(BINS)]
    fig, ax = plt.subplots(figsize=(6, 4))
    for arm, rows in groups.items():
        mean = torch.tensor([r["bins"] for r in rows], dtype=torch.float64).mean(dim=0)
        ax.plot(centres, mean.tolist(), marker="o", label=f"{arm} ({len(rows)} seeds)")
    ax.axvspan(*BAND, color="0.9", label="clients' band")
    ax.set_xlabel("task amplitude")
    ax.set_ylabel(f"MSE after {STEPS} steps")
    ax.set_yscale("log")
    ax.legend()
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(FIGURE, dpi=120)
    plt.close(fig)


def render(record: Path) -> str:
    """The benchmarks section (and the figure), from the record alone."""
    rows = _read(record)
    shown = record.resolve().relative_to(ROOT) if record.resolve().is_relative_to(ROOT) else record
    finals = [r for r in rows if r["kind"] == "final"]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in finals:
        groups.setdefault(r["arm"], []).append(r)
    lines = [
        "## Constraint generators: ablation (`simulations/bench_generators.py`)",
        "",
        f"Rendered from the committed raw record `{shown}` (one JSON line per run; rerun the script to add runs, "
        "`--render` to redraw). The adversarial generator is our reconstruction of seed 000 (docs/generators.md). "
        f"8 clients, all in every round, 5 sinusoid tasks each with amplitudes in {BAND}; centralized reference "
        f"(the federation's loop), MAML, MLP 40-40, one inner step of 0.01, Adam 1e-3. Held-out: {EVAL_TASKS} "
        f"tasks with amplitudes in {HELDOUT}, MSE after {STEPS} steps, mean over seeds ± 95% interval. Prior told "
        f"to direct and adversarial: the family's form and an output bound of {PRIOR[1]:g} (amplitude box {PRIOR}); "
        f"direct-full is told the held-out range (upper reference). λ chosen on {VALIDATION_TASKS} validation "
        "tasks (own stream) with one selection seed.",
        "",
        "| arm | rounds | seeds | λ | held-out MSE | worst 10% | in-band MSE | s/round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for arm in ARMS:
        rs = groups.get(arm)
        if not rs:
            continue
        held, band = _pooled(rs, "heldout_mse"), _pooled(rs, "band_mse")
        worst = sum(r["worst10_mse"] for r in rs) / len(rs)
        sec = sum(r["sec_per_round"] for r in rs) / len(rs)
        lines.append(f"| {arm} | {rs[0]['rounds']} | {len(rs)} | {rs[0]['weight']:g} | {held[0]:.3f} ± {held[1]:.3f} "
                     f"| {worst:.3f} | {band[0]:.3f} ± {band[1]:.3f} | {sec:.4f} |")
    selects = [r for r in rows if r["kind"] == "select"]
    if selects:
        lines += ["", "Validation MSE of the λ grid (selection seed):", "",
                  "| arm | rounds | λ | validation MSE |", "|---|---|---|---|"]
        for r in sorted(selects, key=lambda r: (r["arm"], r["rounds"], r["weight"])):
            lines.append(f"| {r['arm']} | {r['rounds']} | {r['weight']:g} | {r['val_mse']:.3f} ± {r['val_ci95']:.3f} |")
    if finals:
        _figure(groups)
        lines += ["", f"![MSE by amplitude](figures/{FIGURE.name})"]
    else:
        lines += ["", "*No final runs in the record yet: nothing here shows whether a generator helps.*"]
    lines += ["", f"Machine of the latest render: {machine_line()}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run the ablation (or only ``--render`` its section)."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--select-seed", type=int, default=100)
    p.add_argument("--weights", nargs="+", type=float, default=[0.1, 0.3, 0.5], help="the λ grid")
    p.add_argument("--rounds", type=int, default=1500)
    p.add_argument("--record", default=str(RECORD))
    p.add_argument("--render", action="store_true", help="only rewrite the docs section from the record")
    args = p.parse_args(argv)
    if not args.render:
        run(args)
    update_section("generators", render(Path(args.record)))


if __name__ == "__main__":
    main()
