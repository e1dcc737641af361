"""Distributed-DP benchmark (issue 19): utility at epsilon 1, 4, 8 against client-central and client-local,
and the per-round cost of a secure sum against plain aggregation.

Every run is the centralized reference (``fedmeta.federation.RoundLoop`` over the
``InProcessTransport``, what ``fedmeta centralized`` runs; under ``client-distributed`` it sums
the clients' quantized noisy updates as SecAgg+ would) on sinusoid, ``--clients`` clients all
asked every round. The three DP modes are compared at the same epsilon over the same schedule:

* ``client-central``: the trusted server adds N(0, (z C)^2) to the clipped sum; with every client
  in every round (Poisson rate 1) it is accounted at q = 1, like ``client-distributed``, so the two
  should match;
* ``client-distributed``: the noise comes in shares sized for t = ``--min-survivors``; with no
  dropouts the sum carries sigma sqrt(m / t), accounted as such (calibrated for the worst case n = t);
* ``client-local``: every client adds the full noise to its own update (sensitivity 2C): far worse.

``cost`` runs time a round of ``client-distributed`` against ``none`` (plain aggregation) in
process and, with ``--flower``, in a Flower simulation (SecAgg+'s four exchanges per round).

The raw record ``docs/results/ddp/runs.jsonl`` gets one JSON row per run, appended as each run
finishes; a rerun skips runs already recorded with the same settings (resumable). Do not run the
full plan on a shared machine; a smoke run of one configuration::

    python -m simulations.bench_ddp --rounds 5 --epsilons 4 --modes client-distributed \\
        --record /tmp/ddp-smoke/runs.jsonl --out /tmp/ddp-smoke
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fedmeta.config import Config, config_from_dict
from fedmeta.federation import InProcessTransport, RoundLoop
from fedmeta.privacy.budget import calibrate_config_noise_multiplier

__all__ = ["MODES", "EPSILONS", "run_config", "read_record", "main"]

log = logging.getLogger("bench_ddp")

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "results" / "ddp" / "runs.jsonl"
MODES = ("client-central", "client-distributed", "client-local")
EPSILONS = (1.0, 4.0, 8.0)
CLIENTS = 20
ROUNDS = 200
DELTA = 1e-5


def run_config(mode: str, *, clients: int, rounds: int, epsilon: float | None, min_survivors: int | None) -> Config:
    """Sinusoid K=10, MLP 40x40, MAML, server SGD 0.1 (momentum 0.9), every client every round.

    Args:
        mode: ``privacy.mode`` (``none`` for the cost baseline).
        clients: clients in total and per round.
        rounds: the schedule.
        epsilon: the target the noise multiplier is calibrated for (``None``: sigma 1).
        min_survivors: ``privacy.min_survivors`` under ``client-distributed``.
    """
    privacy: dict[str, Any] = {"mode": mode, "clip_norm": 1.0, "noise_multiplier": 1.0, "delta": DELTA,
                               "noise_seed": 1}  # fmt: skip
    if mode == "client-distributed" and min_survivors is not None:
        privacy["min_survivors"] = min_survivors
    data = {
        "seed": 0,
        "task": {"name": "sinusoid", "shots": 10, "query": 10, "tasks_per_site": 10},
        "model": {"name": "mlp", "hidden": [40, 40]},
        "meta": {"algorithm": "maml", "inner_lr": 0.01, "inner_steps": 1, "tasks_per_client": 2,
                 "outer_optimizer": "sgd", "outer_lr": 0.1, "outer_momentum": 0.9},
        "federation": {"clients_total": clients, "clients_per_round": clients, "rounds": rounds,
                       "sampling": "poisson" if mode == "client-central" else "uniform"},
        "privacy": privacy,
        "eval": {"tasks": 200, "steps": 10, "every": max(1, rounds // 4)},
    }  # fmt: skip
    cfg = config_from_dict(data)
    if epsilon is not None and mode != "none":
        data["privacy"]["noise_multiplier"] = calibrate_config_noise_multiplier(cfg, target_epsilon=epsilon)
        cfg = config_from_dict(data)
    return cfg


def read_record(path: Path = RECORD) -> list[dict[str, Any]]:
    """The rows recorded so far (none if the file does not exist)."""
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _run(cfg: Config, out: Path, *, flower: bool) -> dict[str, Any]:
    t0 = time.perf_counter()
    if flower:
        from fedmeta.flower.simulation import simulate

        summary = simulate(cfg, out, num_cpus=2)
    else:
        summary = RoundLoop(cfg, out, mode="centralized").run(InProcessTransport())
    seconds = time.perf_counter() - t0
    final = summary.get("final") or {}
    privacy = summary.get("privacy") or {}
    return {
        "post_adapt_loss": final.get("post_adapt_loss"),
        "post_adapt_loss_ci95": final.get("post_adapt_loss_ci95"),
        "epsilon": privacy.get("epsilon"),
        "noise_multiplier": cfg.privacy.noise_multiplier,
        "seconds": seconds,
        "seconds_per_round": seconds / max(1, summary.get("rounds_completed") or 1),
    }


def _append(path: Path, row: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(row, sort_keys=True) + "\n")
        fh.flush()


def main(argv: Sequence[str] | None = None) -> None:
    """Run the planned runs not yet in the record, appending each as it finishes."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=list(MODES))
    ap.add_argument("--epsilons", nargs="+", type=float, default=list(EPSILONS))
    ap.add_argument("--clients", type=int, default=CLIENTS)
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--min-survivors", type=int, default=None)
    ap.add_argument("--cost", action="store_true", help="also time client-distributed against none")
    ap.add_argument("--flower", action="store_true", help="cost runs in a Flower simulation too")
    ap.add_argument("--record", type=Path, default=RECORD)
    ap.add_argument("--out", type=Path, default=Path("runs") / "bench-ddp")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    done = {(r["part"], r["mode"], r.get("epsilon_target"), r["clients"], r["rounds"], r.get("transport"))
            for r in read_record(args.record)}  # fmt: skip
    plan: list[tuple[str, str, float | None, str]] = [
        ("utility", mode, eps, "in-process") for eps in args.epsilons for mode in args.modes
    ]
    if args.cost:
        for transport in ("in-process", "flower") if args.flower else ("in-process",):
            plan += [("cost", mode, None, transport) for mode in ("none", "client-distributed")]
    for part, mode, eps, transport in plan:
        key = (part, mode, eps, args.clients, args.rounds, transport)
        if key in done:
            log.info("skip %s (recorded)", key)
            continue
        cfg = run_config(mode, clients=args.clients, rounds=args.rounds, epsilon=eps, min_survivors=args.min_survivors)
        out = args.out / f"{part}-{mode}-{eps}-{transport}"
        log.info("run %s", key)
        row = {"part": part, "mode": mode, "epsilon_target": eps, "clients": args.clients, "rounds": args.rounds,
               "transport": transport, "min_survivors": cfg.privacy.min_survivors,
               **_run(cfg, out, flower=transport == "flower")}  # fmt: skip
        _append(args.record, row)


if __name__ == "__main__":
    main()
