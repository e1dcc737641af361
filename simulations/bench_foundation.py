"""Foundation benchmarks: MAML's sinusoid anchor for every algorithm, and the speed of the loop.

Writes the ``foundation`` section of ``docs/benchmarks.md`` and ``docs/figures/foundation_*.png``.

Usage::

    python -m simulations.bench_foundation                 # 20,000 iterations per algorithm
    python -m simulations.bench_foundation --iterations 2000 --skip-accuracy   # speed only, quick

Accuracy: sinusoid, K=10, inner lr 0.01, 1 inner step, meta-batch 25 (25 clients x 1 task),
Adam 1e-3, evaluated on 600 held-out tasks after 1 and 10 test-time steps (Finn et al., 2017).
Speed: one centralized meta-iteration against a plain, independent vmapped second-order MAML
written with nothing but ``torch.func`` on the same 25 tasks, timed side by side.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.func import grad, vmap

from fedmeta.centralized import run_centralized
from fedmeta.config import config_from_dict, to_dict
from fedmeta.experiment import Experiment
from fedmeta.outputs import read_metrics
from fedmeta.rng import make_generator
from simulations.report import machine_line, save_record, update_section

DOCS = Path(__file__).resolve().parents[1] / "docs"

ALGORITHMS = {
    "maml": {},
    "fomaml": {},
    "reptile": {"inner_steps": 5},
    "metasgd": {},
    "anil": {},
}


def sinusoid_config(algorithm: str, iterations: int, **meta: object) -> dict:
    return {
        "seed": 0,
        "task": {"name": "sinusoid", "shots": 10, "query": 10},
        "model": {"name": "mlp", "hidden": [40, 40]},
        "meta": {
            "algorithm": algorithm,
            "inner_lr": 0.01,
            "inner_steps": 1,
            "outer_optimizer": "adam",
            "outer_lr": 0.001,
            "tasks_per_client": 1,
            **meta,
        },
        "federation": {"clients_total": 1000, "clients_per_round": 25, "rounds": iterations},
        "eval": {"tasks": 600, "steps": 10, "every": max(1, iterations // 10)},
    }


def accuracy(iterations: int, out: Path, *, reuse: bool = False) -> list[dict]:
    """Train every algorithm (or, with ``reuse``, read the summaries an earlier run left in ``out``)."""
    rows = []
    for name, extra in ALGORITHMS.items():
        cfg = config_from_dict(sinusoid_config(name, iterations, **extra))
        done = out / name / "summary.json"
        if reuse and done.exists() and json.loads(done.read_text())["config"] == to_dict(cfg):
            summary = json.loads(done.read_text())
            seconds = summary["wall_seconds"]
        else:
            t0 = time.perf_counter()
            summary = run_centralized(cfg, out / name)
            seconds = time.perf_counter() - t0
        final = summary["final"]
        rows.append(
            {
                "algorithm": name,
                "extra": extra,
                "seconds": seconds,
                **{
                    k: final.get(k)
                    for k in (
                        "pre_adapt_loss",
                        "pre_adapt_loss_ci95",
                        "post_adapt_loss_1step",
                        "post_adapt_loss_1step_ci95",
                        "post_adapt_loss",
                        "post_adapt_loss_ci95",
                    )
                },
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    return rows


def plot_accuracy(out: Path, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    for name in ALGORITHMS:
        rows = [r for r in read_metrics(out / name / "metrics.jsonl") if r.get("eval")]
        ax[0].plot(
            [r["round"] for r in rows], [r["eval"]["post_adapt_loss"] for r in rows], marker="o", ms=3, label=name
        )
        curve = rows[-1]["eval"]["loss_curve"]
        ax[1].plot(range(len(curve)), curve, marker="o", ms=3, label=name)
    ax[0].set(xlabel="meta-iteration", ylabel="held-out MSE after 10 steps", yscale="log", title="sinusoid, K=10")
    ax[1].set(xlabel="test-time inner steps", ylabel="held-out MSE", yscale="log", title="adaptation at the end")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- an independent plain implementation, used only as the speed yardstick ----------------------


def _plain_forward(p: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    h = torch.relu(x @ p["w1"].T + p["b1"])
    h = torch.relu(h @ p["w2"].T + p["b2"])
    return h @ p["w3"].T + p["b3"]


def _plain_task_grad(
    p: dict[str, torch.Tensor], sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
) -> dict[str, torch.Tensor]:
    def outer(p: dict[str, torch.Tensor]) -> torch.Tensor:
        g = grad(lambda q: ((_plain_forward(q, sx) - sy) ** 2).mean())(p)
        fast = {k: p[k] - 0.01 * g[k] for k in p}
        return ((_plain_forward(fast, qx) - qy) ** 2).mean()

    return grad(outer)(p)


def speed(iterations: int) -> dict:
    cfg = config_from_dict(sinusoid_config("maml", iterations))
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    opt = exp.server_optimizer(meta)
    family = exp.source.family()
    plain = {
        "w1": torch.randn(40, 1) * 0.5,
        "b1": torch.zeros(40),
        "w2": torch.randn(40, 40) * 0.15,
        "b2": torch.zeros(40),
        "w3": torch.randn(1, 40) * 0.15,
        "b3": torch.zeros(1),
    }
    plain_opt = torch.optim.Adam([t.requires_grad_(True) for t in plain.values()], lr=1e-3)
    plain_fn = vmap(_plain_task_grad, in_dims=(None, 0, 0, 0, 0))

    def fedmeta_iteration(r: int) -> None:
        nonlocal meta
        result = exp.round_updates(meta, r, exp.sample_round(r))
        meta = opt.step(exp.aggregate(result))

    def fedmeta_math_only(tasks) -> None:
        nonlocal meta
        grads, _ = exp.algorithm.task_updates(meta, tasks)
        meta = opt.step({k: v.mean(0) for k, v in grads.items()})

    def plain_iteration(tasks) -> None:
        g = plain_fn(
            {k: v.detach() for k, v in plain.items()}, tasks.support_x, tasks.support_y, tasks.query_x, tasks.query_y
        )
        for k, t in plain.items():
            t.grad = g[k].mean(0)
        plain_opt.step()

    fixed = family.sample(make_generator(0, "bench"), 25)
    timings = {"fedmeta_full": [], "fedmeta_math": [], "plain_vmap": [], "task_sampling": []}
    for r in range(1, iterations + 1):  # interleaved so that machine noise hits all alike
        t0 = time.perf_counter()
        fedmeta_iteration(r)
        t1 = time.perf_counter()
        fedmeta_math_only(fixed)
        t2 = time.perf_counter()
        plain_iteration(fixed)
        t3 = time.perf_counter()
        [exp.source.client_tasks(r, c) for c in exp.sample_round(r)]
        t4 = time.perf_counter()
        if r > 20:  # warm-up
            timings["fedmeta_full"].append(t1 - t0)
            timings["fedmeta_math"].append(t2 - t1)
            timings["plain_vmap"].append(t3 - t2)
            timings["task_sampling"].append(t4 - t3)
    med = {k: sorted(v)[len(v) // 2] * 1e3 for k, v in timings.items()}
    return med


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--iterations", type=int, default=20000)
    parser.add_argument("--speed-iterations", type=int, default=500)
    parser.add_argument("--out", default="runs/bench_foundation")
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="read finished runs in --out instead of retraining them")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1: immune to oversubscription on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    command = "`python -m simulations.bench_foundation" + (
        f" --iterations {args.iterations}" if args.iterations != 20000 else ""
    )
    if not args.skip_accuracy:
        lines = [
            "## Foundation: MAML's sinusoid anchor",
            "",
            f"Machine: {machine_line()}. Command: {command} --skip-speed`.",
            "",
        ]
        rows = accuracy(args.iterations, out, reuse=args.reuse)
        save_record("foundation-accuracy", "rows", rows)  # the raw record the table is rendered from
        figure = DOCS / "figures" / "foundation_sinusoid.png"
        plot_accuracy(out, figure)
        lines += [
            f"Sinusoid (A ∈ [0.1, 5], φ ∈ [0, π], x ∈ [−5, 5]), K = 10, inner lr 0.01, 1 inner step "
            f"(Reptile: 5), meta-batch 25, Adam 1e-3, {args.iterations:,} meta-iterations; "
            "600 held-out tasks, mean MSE ± 95% interval. Anchor: a plain vmapped second-order MAML "
            "measured on this kind of machine reached 0.367 (1 step) / 0.113 (10 steps); the issue's "
            "bar is ≤ 0.40 / ≤ 0.13.",
            "",
            "| algorithm | before adaptation | after 1 step | after 10 steps | training time |",
            "| --- | --- | --- | --- | --- |",
        ]
        def cell(r: dict, key: str) -> str:
            if r[key] is None or not math.isfinite(r[key]):
                return "diverges"
            return f"{r[key]:.3f} ± {r[key + '_ci95']:.3f}"

        for r in rows:
            lines.append(
                f"| {r['algorithm']} | {cell(r, 'pre_adapt_loss')} | {cell(r, 'post_adapt_loss_1step')} "
                f"| {cell(r, 'post_adapt_loss')} | {r['seconds']:.0f} s |"
            )
        lines += [
            "",
            "Meta-SGD learns per-parameter step sizes for exactly one inner step; they grow large, "
            "and ten steps with them overshoot — its one-step column is the number that compares "
            "(Li et al. report Meta-SGD's sinusoid results after one step too).",
        ]
        lines += [
            "",
            "![held-out MSE during training and against test-time steps](figures/foundation_sinusoid.png)",
            "",
        ]
        update_section("foundation-accuracy", "\n".join(lines))
        print("\n".join(lines))
    if args.skip_speed:
        return
    med = speed(args.speed_iterations)
    save_record("foundation-speed", "speed", med)
    lines = [
        "## Foundation: speed of the centralized loop",
        "",
        f"Machine: {machine_line()}. Command: {command} --skip-accuracy`.",
        "",
        f"Speed, median over {args.speed_iterations - 20} iterations interleaved in one process "
        "(25 sinusoid tasks, second-order MAML, 1 inner step):",
        "",
        "| what | ms per meta-iteration |",
        "| --- | --- |",
        "| fedmeta centralized iteration (sample cohort, draw 25 clients' tasks, vmapped per-task meta-gradients, "
        f"aggregate, Adam) | {med['fedmeta_full']:.2f} |",
        f"| fedmeta math only (vmapped per-task meta-gradients + Adam, tasks given) | {med['fedmeta_math']:.2f} |",
        f"| plain independent vmapped MAML (torch.func, hand-written MLP, same tasks) | {med['plain_vmap']:.2f} |",
        f"| of which task drawing for 25 clients (one generator per client and round) | {med['task_sampling']:.2f} |",
        "",
        f"fedmeta's math costs {med['fedmeta_math'] / med['plain_vmap']:.2f}× the plain implementation; "
        f"the full iteration {med['fedmeta_full'] / med['plain_vmap']:.2f}×, the difference being the "
        "per-client task drawing that makes every client's tasks a function of (seed, round, client).",
    ]
    update_section("foundation-speed", "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
