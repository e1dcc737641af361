"""The hostile-client benchmark's record: docs/benchmarks.md's section is rendered from it."""

from __future__ import annotations

import re

from simulations.bench_hostile import RECORD, ROUNDS, RULES, plan, read_record, render_markdown
from simulations.report import BENCHMARKS


def _section() -> str:
    text = BENCHMARKS.read_text(encoding="utf-8")
    match = re.search(r"<!-- BEGIN hostile -->\n(.*?)<!-- END hostile -->", text, re.S)
    assert match, "docs/benchmarks.md has no hostile section"
    return match.group(1)


def test_the_committed_section_is_what_the_record_renders() -> None:
    section = _section()
    machine = re.search(r"^Machine: (.*?)\. Command:", section, re.M)
    assert machine is not None
    assert section == render_markdown(read_record(RECORD), rounds=ROUNDS, machine=machine.group(1))


def test_every_recorded_run_is_a_planned_one_with_a_result() -> None:
    rows = read_record(RECORD)
    planned = set(plan(ROUNDS))
    assert rows and all((r["rule"], r["fault"], int(r["hostile"])) in planned | {("krum", "scaled", 2)} for r in rows)
    assert all(("post_adapt_loss" in r or "error" in r) and int(r["rounds"]) == ROUNDS for r in rows)


def test_render_marks_missing_and_diverged_runs_and_states_the_aim() -> None:
    from simulations.bench_hostile import FAULTS_RUN

    rows = [{"rule": r, "fault": "none", "hostile": 0, "rounds": 5, "post_adapt_loss": 1.0,
             "post_adapt_loss_ci95": 0.1} for r, _ in RULES]  # fmt: skip
    rows += [
        {"rule": r, "fault": f, "hostile": 2, "rounds": 5, "post_adapt_loss": 1.2} for f in FAULTS_RUN for r, _ in RULES
    ]
    rows[-1] = {**rows[-1], "post_adapt_loss": float("nan")}  # norm_bound, claim_tasks
    rows.append({"rule": "mean", "fault": "scaled", "hostile": 1, "rounds": 5, "error": "boom"})
    text = render_markdown(rows, rounds=5, machine="m")
    assert "| `scaled` | 1.200 (1.20×) |" in text and "diverges" in text and "fails" in text
    assert "| `sign_flip` | — |" in text  # 1 hostile: only one run recorded
    assert "Held by `median`, `trimmed_mean`, `multikrum`. Missed by `norm_bound`." in text
    partial = render_markdown([r for r in rows if r["fault"] != "nan"], rounds=5, machine="m")
    assert "Aim" not in partial  # no verdict before every fault has been run
