"""Scale benchmark (issue 16): ``fedmeta simulate`` on a node pool against ``fedmeta centralized``, side by side.

Writes the ``scale`` section of ``docs/benchmarks.md`` from the raw record
``docs/results/scale/records.jsonl``, one JSON line per measured run, appended as the benchmark
goes (an interrupted run resumes: cases already in the record are skipped unless ``--redo``).
Sinusoid, 10 tasks per client, no privacy:

* ``overhead-10`` / ``-100`` / ``-1000``: 10, 100 and 1,000 clients per round (10 times as many
  registered), ``simulate`` and ``centralized`` one after the other in the same run;
* ``registered-10k-100``, ``-1m-100``, ``-1m-1000``: 10,000 and 1,000,000 registered clients
  with 100 and 1,000 per round (10,000 with 1,000 per round is ``overhead-1000``).

Per round is the median of the rows' ``seconds`` in ``metrics.jsonl`` over the rounds after the
first, evaluation rounds left out (so start-up does not enter it); start-up is the run's wall time
minus the sum of its rounds. Flower's fixed per-round latency is reported on its own: a pooled
round's ``send_receive`` time minus the nodes' compute time (their reported compute seconds over
the number of nodes, which run in parallel). Peak RSS is the summed RSS of this process and all
its descendants (Ray's processes and actors included), sampled every 0.5 s.

Usage::

    python -m simulations.bench_scale                          # every case (long on 2 cores)
    python -m simulations.bench_scale --only overhead-10 overhead-100 registered-10k-100 --rounds 6
    python -m simulations.bench_scale --render                 # only re-render the section from the record
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fedmeta.config import Config, load_config
from simulations.report import machine_line, record_dir, update_section

REPO = Path(__file__).resolve().parents[1]
SECTION = "scale"
RECORD = record_dir(SECTION) / "records.jsonl"
log = logging.getLogger("bench_scale")

#: case name -> (registered clients, clients per round)
CASES: dict[str, tuple[int, int]] = {
    "overhead-10": (100, 10),
    "overhead-100": (1_000, 100),
    "overhead-1000": (10_000, 1_000),
    "registered-10k-100": (10_000, 100),
    "registered-1m-100": (1_000_000, 100),
    "registered-1m-1000": (1_000_000, 1_000),
}
#: Flower's simulation engine sweeps its nodes every 0.1 s (vce_api.py); reported for reference
FLOWER_SWEEP_S = 0.1


def case_config(total: int, per_round: int, rounds: int) -> Config:
    """The benchmark's config: ``configs/sinusoid.yaml``, 10 tasks per client, no privacy, evaluation at the end."""
    base = load_config(REPO / "configs" / "sinusoid.yaml")
    return replace(
        base,
        meta=replace(base.meta, tasks_per_client=10),
        federation=replace(
            base.federation,
            clients_total=total,
            clients_per_round=per_round,
            rounds=rounds,
            join_timeout=1800,
            round_timeout=600,
        ),
        privacy=replace(base.privacy, mode="none"),
        eval=replace(base.eval, tasks=100, every=rounds),
    )


def read_record(path: Path = RECORD) -> list[dict[str, Any]]:
    """Every line of the raw record (an empty list when there is none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _append(entry: dict[str, Any], path: Path = RECORD) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps(entry) + "\n")
        fh.flush()


def _rows(out: Path) -> list[dict[str, Any]]:
    from fedmeta.outputs import read_metrics

    return [r for r in read_metrics(out / "metrics.jsonl") if "train" in r]


def _median(rows: list[dict[str, Any]], key: str, rounds: int) -> float:
    """Median over the rounds after the first, the evaluation round left out, of ``seconds`` or a timing."""
    vals = []
    for r in rows:
        if r["round"] == 1 or r["round"] == rounds or "eval" in r:
            continue
        vals.append(r["seconds"] if key == "seconds" else r.get("timing", {}).get(key, 0.0))
    return statistics.median(vals) if vals else float("nan")


def _measure(path: str, cfg: Config, out: Path, *, threads: int | None = None) -> dict[str, Any]:
    """Run ``cfg`` by ``path`` (``simulate`` or ``centralized``) and what the record keeps of it.

    ``threads`` sets torch's threads in this process for the run (centralized; ``None``: as it is).
    """
    from simulations.bench_federation import TreeMemory

    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        with TreeMemory() as mem:
            if path == "simulate":
                from fedmeta.flower.simulation import simulate

                summary = simulate(cfg, out)
            else:
                from fedmeta.centralized import run_centralized

                summary = run_centralized(cfg, out)
    finally:
        torch.set_num_threads(before)
    wall = time.perf_counter() - started
    rows = _rows(out)
    rounds = cfg.federation.rounds
    entry: dict[str, Any] = {
        "path": path,
        "clients_total": cfg.federation.clients_total,
        "clients_per_round": cfg.federation.clients_per_round,
        "rounds": len(rows),
        "round_s": _median(rows, "seconds", rounds),
        "wall_s": wall,
        "startup_s": wall - sum(r["seconds"] for r in rows),
        "peak_rss_mb": mem.peak / 2**20,
        "peak_driver_rss_mb": mem.peak_self / 2**20,
        "final_post_adapt_loss": summary["final"].get("post_adapt_loss"),
        "torch_threads": threads if threads is not None else before,
    }
    if path == "simulate":
        fed = summary.get("federation", {})
        nodes = int(fed.get("pool_nodes", 0)) or 1
        send = _median(rows, "send_receive", rounds)
        compute = _median(rows, "client_compute_sum", rounds) / nodes
        entry.update(
            pool_nodes=fed.get("pool_nodes"),
            discovery_s=fed.get("discovery_seconds"),
            send_receive_s=send,
            node_compute_s=compute,
            flower_latency_s=send - compute,
        )
    return entry


def run(cases: list[str], *, rounds: int, out: Path, redo: bool, partial: bool, paths: list[str]) -> None:
    """Measure ``cases`` (``paths`` of each: simulate, then centralized) and append them to the record.

    The centralized reference runs twice, with 1 torch thread and with torch's default, and keeps
    the faster (on a loaded 2-core machine two threads can be slower than one); the simulation's
    Ray actors run one thread each.
    """
    from fedmeta.flower.env import configure_environment

    configure_environment()
    done = {(e["case"], e["path"]) for e in read_record() if e.get("rounds_asked") == rounds}
    for case in cases:
        total, per_round = CASES[case]
        cfg = case_config(total, per_round, rounds)
        for path in paths:
            if (case, path) in done and not redo:
                log.info("%s %s: in the record, skipped", case, path)
                continue
            log.info("%s: %s, %d registered, %d per round, %d rounds", case, path, total, per_round, rounds)
            if path == "simulate":
                entry = _measure(path, cfg, out / case / path)
            else:
                runs = [_measure(path, cfg, out / case / f"{path}-{n}", threads=n) for n in (1, None)]
                entry = min(runs, key=lambda e: e["round_s"])
                entry["round_s_by_threads"] = {str(e["torch_threads"]): e["round_s"] for e in runs}
            entry.update(case=case, rounds_asked=rounds, partial_run=partial, machine=machine_line())
            _append(entry)
            log.info("%s %s: %.4f s per round, start-up %.1f s", case, path, entry["round_s"], entry["startup_s"])


def _latest(record: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    latest: dict[tuple[str, str], dict[str, Any]] = {}
    for e in record:
        latest[(e["case"], e["path"])] = e
    return latest


def section(record: list[dict[str, Any]]) -> str:
    """The ``scale`` section of docs/benchmarks.md, rendered from the raw record."""
    rel = RECORD.relative_to(REPO).as_posix()
    latest = _latest(record)
    measured = [c for c in CASES if (c, "simulate") in latest and (c, "centralized") in latest]
    missing = [c for c in CASES if c not in measured]
    lines = [
        "## Scale: a node pool against the in-process loop (issue 16)",
        "",
        f"Rendered by `python -m simulations.bench_scale --render` from the raw record `{rel}` "
        "(one line per run, appended as the benchmark goes). Sinusoid, 10 tasks per client, no privacy; "
        "`simulate` runs on a pool of simulation nodes (`simulation.pool`, one node per Ray actor), each "
        "round's cohort split over the nodes and computed there in one batched pass per node. Per round: the "
        "median of `metrics.jsonl`'s round times after the first round, the evaluation round left out "
        "(start-up apart); Flower's latency: a round's `send_receive` minus the nodes' compute time "
        f"(its simulation engine sweeps the nodes every {FLOWER_SWEEP_S:g} s); centralized: the faster of 1 torch "
        "thread and torch's default; peak RSS: this process and every descendant (Ray included).",
        "",
    ]
    if any(e.get("partial_run") for e in record) or missing:
        lines += [
            f"**Partial run.** Measured: {', '.join(measured) or 'nothing yet'}; not measured yet: "
            f"{', '.join(missing) or 'none'} (`python -m simulations.bench_scale` measures the rest and keeps "
            "what the record holds).",
            "",
        ]
    lines += [
        "| case | registered | per round | rounds | simulate s/round | centralized s/round | ratio | "
        "simulate − Flower latency, / centralized | Flower latency s | start-up s (sim / cen) | "
        "peak RSS MiB (sim / cen) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for case in measured:
        s, c = latest[(case, "simulate")], latest[(case, "centralized")]
        ratio = s["round_s"] / c["round_s"]
        net = (s["round_s"] - s["flower_latency_s"]) / c["round_s"]
        lines.append(
            f"| {case} | {s['clients_total']:,} | {s['clients_per_round']:,} | {s['rounds']} | {s['round_s']:.4f} | "
            f"{c['round_s']:.4f} | {ratio:.1f}× | {net:.2f}× | {s['flower_latency_s']:.3f} | "
            f"{s['startup_s']:.1f} / {c['startup_s']:.1f} | {s['peak_rss_mb']:.0f} / {c['peak_rss_mb']:.0f} |"
        )
    base = latest.get(("overhead-10", "simulate"))
    if base is not None:
        beyond = [
            f"{case} {latest[(case, 'simulate')]['startup_s'] - base['startup_s']:+.1f} s"
            for case in measured
            if case.startswith("registered-")
        ]
        if beyond:
            lines += [
                "",
                "Start-up of `simulate` beyond that of overhead-10 in the same record: " + "; ".join(beyond) + ". "
                "The first simulation of a benchmark process also pays the first import of Ray and Flower and a "
                "cold start of Ray, so a later, larger run can start faster than overhead-10.",
            ]
    machines = [e["machine"] for e in record if e.get("machine")]
    if machines:
        lines += ["", "Machine of the latest run: " + machines[-1] + "."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Command line: measure the chosen cases (or only render), then rewrite the section."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(CASES), help="cases to measure (default: all)")
    parser.add_argument("--rounds", type=int, default=12, help="rounds per run (default 12)")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scale"), help="where the runs write their outputs")
    parser.add_argument("--redo", action="store_true", help="measure cases the record already holds again")
    parser.add_argument("--partial", action="store_true", help="mark these runs as a partial run in the record")
    parser.add_argument("--render", action="store_true", help="only re-render the section from the record")
    parser.add_argument(
        "--paths", nargs="+", choices=["simulate", "centralized"], default=["simulate", "centralized"],
        help="which paths to measure (default both)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if not args.render:
        torch.manual_seed(0)
        cases = args.only or list(CASES)
        run(cases, rounds=args.rounds, out=args.out, redo=args.redo, partial=args.partial, paths=args.paths)
    update_section(SECTION, section(read_record()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
