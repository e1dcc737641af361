"""Hostile-client benchmark: every aggregation rule against clients that send bad updates.

Writes the ``hostile`` section of ``docs/benchmarks.md`` from the raw record
``docs/results/hostile/runs.jsonl`` (committed; one JSON row per run, appended as each run
finishes, so an interrupted benchmark keeps what it measured and a rerun skips the runs already
recorded with the same settings).

Every run is the centralized reference (``fedmeta.federation.RoundLoop`` over the
``InProcessTransport``, what ``fedmeta centralized`` runs) on sinusoid, 10 of 100 clients per
round, with the in-process transport wrapped in :class:`fedmeta.federation.HostileClients`: in every
round 1, 2 or 4 of the 10 sampled clients (a seeded draw) pass their honest reply through a fault
of :data:`fedmeta.federation.FAULTS` before the loop validates it:

* ``scaled``: the update ×100; ``sign_flip``: minus the update; ``random``: Gaussian noise of 10×
  the honest update's norm; ``nan``: NaN everywhere (the loop refuses it); ``stale``: the update
  sent 10 rounds earlier; ``claim_tasks``: the honest update claiming 10^6 tasks (the loop caps
  a reply's weight at ``meta.tasks_per_client × meta.local_steps``).

Each rule's held-out MSE after 10 adaptation steps (the same held-out tasks in every run) is
compared with the clean run of the plain mean, the federation the rule is meant to protect.

Usage (about 20 minutes on one free core, far longer on a loaded machine; niced, in the background,
with a log; ``--counts 2`` runs the hostile count the aim is stated for only)::

    nice -n 10 python -m simulations.bench_hostile > runs/bench-hostile.log 2>&1 &
    python -m simulations.bench_hostile --report-only        # re-render the section from the record
    python -m simulations.bench_hostile --rounds 20 --no-write --out /tmp/h   # smoke run (record in --out)
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from fedmeta.config import Config, load_config
from fedmeta.errors import FedMetaError
from fedmeta.federation import HostileClients, InProcessTransport, RoundLoop, make_fault
from simulations.report import machine_line, update_section

__all__ = ["RULES", "FAULTS_RUN", "HOSTILE_COUNTS", "run_config", "render_markdown", "read_record", "main"]

log = logging.getLogger("bench_hostile")

ROOT = Path(__file__).resolve().parents[1]
RECORD = ROOT / "docs" / "results" / "hostile" / "runs.jsonl"

#: ``(rule name in the table, config overrides)``; the trimmed mean and multi-Krum are set for 2 hostile.
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("mean", ("federation.aggregation=mean",)),
    ("median", ("federation.aggregation=median",)),
    ("trimmed_mean", ("federation.aggregation=trimmed_mean", "federation.trim_fraction=0.2")),
    ("multikrum", ("federation.aggregation=multikrum", "federation.krum_f=2")),
    ("norm_bound", ("federation.aggregation=norm_bound",)),
)
#: Rules with a clean run only (reported in a note): Krum keeps one update of the ten, and its
#: clean run is already far from the mean's, so it is not run against the faults.
CLEAN_ONLY: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("krum", ("federation.aggregation=krum", "federation.krum_f=2")),
)
FAULTS_RUN = ("scaled", "sign_flip", "random", "nan", "stale", "claim_tasks")
HOSTILE_COUNTS = (2, 4, 1)  # 2 first: the aim is stated for it
ROUNDS = 300
AIM = 1.5

#: The federation and recipe every run shares (sinusoid.yaml plus these).
BASE = (
    "federation.clients_total=100",
    "federation.clients_per_round=10",
    "meta.tasks_per_client=2",
    "meta.outer_lr=0.01",
    "eval.tasks=100",
    "eval.steps=10",
)


def run_config(rule: str, rounds: int) -> Config:
    """The config of ``rule``'s runs (one eval at the end)."""
    sets = dict(RULES + CLEAN_ONLY)[rule]
    return load_config(
        ROOT / "configs" / "sinusoid.yaml", [*BASE, f"federation.rounds={rounds}", f"eval.every={rounds}", *sets]
    )


def _key(rule: str, fault: str, hostile: int, rounds: int) -> tuple[str, str, int, int]:
    return (rule, fault, hostile, rounds)


def read_record(path: Path = RECORD) -> list[dict[str, Any]]:
    """The record's rows, in the order they were written (a missing file: none)."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _latest(rows: Iterable[dict[str, Any]]) -> dict[tuple[str, str, int, int], dict[str, Any]]:
    out = {}
    for row in rows:
        out[_key(row["rule"], row["fault"], int(row["hostile"]), int(row["rounds"]))] = row
    return out


def _one_run(rule: str, fault: str, hostile: int, rounds: int, out: Path) -> dict[str, Any]:
    cfg = run_config(rule, rounds)
    transport: Any = InProcessTransport()
    if hostile:
        transport = HostileClients(transport, make_fault(fault), count=hostile, seed=cfg.seed)
    t0 = time.perf_counter()
    row: dict[str, Any] = {"rule": rule, "fault": fault, "hostile": hostile, "rounds": rounds,
                           "overrides": [*BASE, *dict(RULES + CLEAN_ONLY)[rule]]}  # fmt: skip
    try:
        summary = RoundLoop(cfg, out, mode="centralized", server_eval=True).run(transport)
        final = summary["final"]
        row.update(
            post_adapt_loss=final["post_adapt_loss"],
            post_adapt_loss_ci95=final["post_adapt_loss_ci95"],
            pre_adapt_loss=final["pre_adapt_loss"],
            rejected=summary.get("federation", {}).get("rejected"),
        )
    except (FedMetaError, ValueError, RuntimeError) as exc:  # a run the rule cannot survive is a result
        log.warning("%s / %s / %d hostile failed: %s", rule, fault, hostile, exc)
        row["error"] = f"{type(exc).__name__}: {exc}"[:300]
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["machine"] = machine_line()
    row["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return row


def plan(rounds: int, counts: Sequence[int] = HOSTILE_COUNTS) -> list[tuple[str, str, int]]:
    """Every run: each rule's clean run first, then each hostile count's faults × rules."""
    runs = [(rule, "none", 0) for rule, _ in RULES + CLEAN_ONLY]
    for k in counts:
        runs += [(rule, fault, k) for fault in FAULTS_RUN for rule, _ in RULES]
    return runs


def _fmt(row: dict[str, Any] | None, clean: float | None) -> str:
    if row is None:
        return "—"
    loss = row.get("post_adapt_loss")
    if loss is None or not math.isfinite(loss):
        return "fails" if "error" in row else "diverges"
    ratio = f" ({loss / clean:.2f}×)" if clean else ""
    return f"{loss:.3f}{ratio}"


def render_markdown(rows: Sequence[dict[str, Any]], *, rounds: int = ROUNDS, machine: str = "") -> str:
    """The ``hostile`` section from the record's rows of ``rounds`` rounds."""
    latest = _latest(r for r in rows if int(r["rounds"]) == rounds)
    rules = [rule for rule, _ in RULES]
    clean_row = latest.get(_key("mean", "none", 0, rounds))
    clean = clean_row.get("post_adapt_loss") if clean_row else None
    lines = [
        "## Hostile clients (`simulations/bench_hostile.py`)",
        "",
        f"Machine: {machine}. Command: `python -m simulations.bench_hostile`; raw record "
        "`docs/results/hostile/runs.jsonl` (this section is rendered from it).",
        "",
        f"Sinusoid, MAML, 10 of 100 clients per round × 2 tasks, Adam 0.01, {rounds} rounds; the centralized "
        "reference (`RoundLoop` + `InProcessTransport`) with `fedmeta.federation.HostileClients` making 1, 2 or 4 "
        "of each round's 10 clients hostile (a seeded draw per round). Faults: `scaled` ×100, `sign_flip`, "
        "`random` (10× the honest norm), `nan` (refused by the loop), `stale` (the update of 10 rounds "
        "earlier), `claim_tasks` (10^6 tasks; the loop caps the weight at `meta.tasks_per_client`). Cell: "
        "held-out MSE after 10 adaptation steps on 100 held-out tasks (the same tasks in every run) and, in "
        "brackets, its ratio to the clean run of the plain mean"
        + (f" ({clean:.3f} ± {clean_row['post_adapt_loss_ci95']:.3f})" if clean_row and clean else "")
        + ". Options: `trimmed_mean` with `trim_fraction: 0.2`, `multikrum` with `krum_f: 2` "
        "(it averages the 8 best), `norm_bound` with the round's median norm. `weighted_median` and "
        "`weighted_trimmed_mean` equal `median` and `trimmed_mean` here (every reply's weight is the same 2 tasks "
        "once claims are capped) and are not run.",
        "",
    ]
    header = "| fault | " + " | ".join(f"`{r}`" for r in rules) + " |"
    rule_line = "| --- |" + " --- |" * len(rules)
    clean_cells = " | ".join(_fmt(latest.get(_key(r, "none", 0, rounds)), clean) for r in rules)
    lines += ["Clean (no hostile client):", "", header, rule_line, f"| none | {clean_cells} |", ""]
    verdict: dict[str, list[float]] = {}  # rule -> its ratios to the clean mean with 2 hostile, one per fault
    for k in sorted({int(r["hostile"]) for r in latest.values() if int(r["hostile"]) > 0}):
        lines += [f"{k} of 10 clients hostile:", "", header, rule_line]
        for fault in FAULTS_RUN:
            cells = []
            for r in rules:
                row = latest.get(_key(r, fault, k, rounds))
                cells.append(_fmt(row, clean))
                if k == 2 and row is not None and clean:
                    loss = row.get("post_adapt_loss")
                    ok = loss is not None and math.isfinite(loss)
                    verdict.setdefault(r, []).append(loss / clean if ok else math.inf)
            lines.append(f"| `{fault}` | " + " | ".join(cells) + " |")
        lines.append("")
    counts_run = {int(r["hostile"]) for r in latest.values()}
    missing = [k for k in sorted(HOSTILE_COUNTS) if k not in counts_run]
    planned = len(plan(rounds))
    done = sum(1 for rule, fault, k in plan(rounds) if _key(rule, fault, k, rounds) in latest)
    if done < planned:
        lines += [
            f"Incomplete record: {done} of the {planned} planned runs ('—': not run yet"
            + (f"; none yet with {' or '.join(map(str, missing))} hostile" if missing else "")
            + "). Rerunning the script resumes from the record.",
            "",
        ]
    for rule, _ in CLEAN_ONLY:
        row = latest.get(_key(rule, "none", 0, rounds))
        if row is not None and clean:
            lines += [
                f"`{rule}` (`krum_f: 2`) ran clean only: {_fmt(row, clean)}. It keeps one update of the ten, so its "
                "aggregate is as noisy as one client's; the faults were run on `multikrum` instead.",
                "",
            ]
    complete = {r: max(v) for r, v in verdict.items() if len(v) == len(FAULTS_RUN)}
    if complete:
        own = {}
        for r in complete:
            own_clean = (latest.get(_key(r, "none", 0, rounds)) or {}).get("post_adapt_loss")
            if own_clean and clean:
                own[r] = complete[r] * clean / own_clean
        held = [r for r in rules if r != "mean" and complete.get(r, math.inf) <= AIM]
        missed = [r for r in rules if r != "mean" and r in complete and complete[r] > AIM]
        worst = ", ".join(
            f"`{r}` {complete[r]:.2f}×" + (f" ({own[r]:.2f}× its own clean run)" if r in own else "")
            for r in rules
            if r in complete
        )
        lines.append(
            f"Aim (2 of 10 hostile, every fault, within {AIM}× of the clean mean): worst ratio per rule: {worst}. "
            + (f"Held by {', '.join(f'`{r}`' for r in held)}. " if held else "Held by no robust rule. ")
            + (f"Missed by {', '.join(f'`{r}`' for r in missed)}." if missed else "")
        )
    return "\n".join(lines).rstrip() + "\n"


def main(argv: Sequence[str] | None = None) -> None:
    """Run what the record lacks (appending a row per run), then render the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument("--out", type=Path, default=Path("runs/bench-hostile"), help="run folders (not kept)")
    parser.add_argument("--record", type=Path, default=None, help=f"raw record (default {RECORD})")
    parser.add_argument("--report-only", action="store_true", help="only render the section from the record")
    parser.add_argument("--no-write", action="store_true", help="record under --out, leave docs/ as it is")
    parser.add_argument("--counts", type=int, nargs="*", default=list(HOSTILE_COUNTS))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("fedmeta").setLevel(logging.ERROR)  # the faults' warnings would flood the log
    torch.set_num_threads(1)
    record = args.record or (args.out / "runs.jsonl" if args.no_write else RECORD)
    if not args.report_only:
        done = _latest(read_record(record))
        record.parent.mkdir(parents=True, exist_ok=True)
        todo = [r for r in plan(args.rounds, args.counts) if _key(*r, args.rounds) not in done]
        log.info("%d runs to do (%d recorded)", len(todo), len(done))
        for i, (rule, fault, k) in enumerate(todo, 1):
            row = _one_run(rule, fault, k, args.rounds, args.out / f"{rule}-{fault}-{k}")
            with record.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(row) + "\n")
            log.info("[%d/%d] %s %s %d: %s (%.1fs)", i, len(todo), rule, fault, k, row.get("post_adapt_loss",
                     row.get("error")), row["seconds"])  # fmt: skip
    if not args.no_write:
        update_section("hostile", render_markdown(read_record(record), rounds=args.rounds, machine=machine_line()))
    else:
        print(render_markdown(read_record(record), rounds=args.rounds, machine=machine_line()))


if __name__ == "__main__":
    main()
