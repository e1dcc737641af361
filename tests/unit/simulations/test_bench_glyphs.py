"""The glyphs benchmark's record: docs/benchmarks.md is rebuilt from committed result files.

The benchmark's runs take hours and their run folders are not kept, so every result file is
recorded under docs/results/glyphs/ and the report is rendered from that record. These tests pin
that the committed section is exactly what the record renders to, and how files of several
processes and sessions are merged (by the time each says it was written, not by file times,
which a git checkout resets).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import pytest

from simulations.bench_glyphs import RESULTS, Run, main, merge_results, render_markdown, training_trajectory
from simulations.report import BENCHMARKS


def _row(run: Run, out: str, acc: float, *, finished: str | None = None) -> dict[str, Any]:
    row: dict[str, Any] = {
        "run": {
            **run.__dict__,
            "extra_eval_steps": list(run.extra_eval_steps),
            "also_eval_ways": list(run.also_eval_ways),
        },
        "out": out,
        "rounds": run.iterations,
        "train_seconds": 60.0,
        "cpu_seconds": 50.0,
        "path": "batched",
        "threads": 1,
        "accuracy": {
            "1": {"pre": [0.2, 0.01], "post": [acc, 0.01], "post_by_steps": {str(run.eval_steps): [acc, 0.01]}}
        },
        "trajectory": {},
    }
    if finished:
        row["finished"] = finished
    return row


def _part(rows: list[dict[str, Any]], written: str) -> dict[str, Any]:
    return {
        "machine": "x86_64, 2 cores, 1 torch threads, torch 2.13.0+cpu, Python 3.11.7, 2026-12-01, 1-minute load "
                   "average 1.0",
        "dates": [written[:10]],
        "written": written,
        "episodes": 600,
        "floor": {"5-1": [0.5, 0.01]},
        "runs": rows,
        "total_seconds": 120.0,
    }


MAML = Run("MAML (2nd order)", 5, "maml", 100, 32, 0.4, 1, 3, 0.003)
PROTO = Run("ANIL, prototype head", 5, "anil", 100, 32, 0.4, 5, 25, 0.001, head_init="prototypes")


def test_the_committed_section_is_what_the_recorded_results_render() -> None:
    text = BENCHMARKS.read_text(encoding="utf-8")
    found = re.search(r"<!-- BEGIN glyphs -->\n(.*?)\n<!-- END glyphs -->", text, re.S)
    assert found, "docs/benchmarks.md has no glyphs section"
    assert found.group(1).strip() == render_markdown(merge_results(RESULTS)).strip(), (
        "docs/benchmarks.md's glyphs section differs from its record: rerun `python -m simulations.bench_glyphs "
        "--report-only`"
    )


def test_the_record_meets_the_aims_it_claims() -> None:
    merged = merge_results(RESULTS)
    best = {}
    for row in merged["runs"]:
        for shots, acc in row["accuracy"].items():
            key = (row["run"]["ways"], int(shots))
            best[key] = max(best.get(key, 0.0), acc["post"][0])
        for setting, acc in row.get("cross", {}).items():
            ways, shots = map(int, setting.split("-"))
            best[(ways, shots)] = max(best.get((ways, shots), 0.0), acc["post"][0])
    assert best[(5, 1)] >= 0.97 and best[(20, 1)] >= 0.90
    # and every setting of the issue has all three algorithms and the pixel floor
    for ways, shots in ((5, 1), (5, 5), (20, 1)):
        assert f"{ways}-{shots}" in merged["floor"]
        algos = {
            r["run"]["algorithm"] for r in merged["runs"] if r["run"]["ways"] == ways and str(shots) in r["accuracy"]
        }
        assert {"metasgd", "anil"} <= algos and algos & {"maml", "fomaml"}


def test_a_later_written_result_supersedes_an_earlier_one_whatever_the_file_times(tmp_path: Path) -> None:
    old = tmp_path / "results-5-b.json"
    new = tmp_path / "results-5-a.json"
    old.write_text(json.dumps(_part([_row(MAML, "5way-maml", 0.80)], "2026-11-21T10:00:00+00:00")))
    new.write_text(json.dumps(_part([_row(MAML, "5way-maml-lr0.003-100it", 0.90)], "2026-12-01T10:00:00+00:00")))
    # a fresh checkout gives the files arbitrary modification times: make them lie
    os.utime(new, (1_000_000, 1_000_000))
    os.utime(old, (2_000_000, 2_000_000))
    merged = merge_results(tmp_path)
    assert [r["accuracy"]["1"]["post"][0] for r in merged["runs"]] == [0.90]
    assert [r["accuracy"]["1"]["post"][0] for r in merged["superseded"]] == [0.80]
    assert merged["dates"] == ["2026-11-21", "2026-12-01"]
    markdown = render_markdown(merged)
    assert (
        "runs of 2026-11-21 to 2026-12-01" in markdown
        and "~~MAML (2nd order)~~ (superseded: 1-shot 80.0 ± 1.0)" in markdown
    )


def test_a_cross_evaluation_older_than_its_run_is_stale(tmp_path: Path) -> None:
    part = _part(
        [_row(PROTO, "5way-anil-prototypes", 0.95, finished="2026-12-01T12:00:00+00:00")], "2026-12-01T12:00:00+00:00"
    )
    (tmp_path / "results-5.json").write_text(json.dumps(part))
    stale = {
        "out": "5way-anil-prototypes",
        "written": "2026-12-01T11:00:00+00:00",
        "cross": {"20-1": {"pre": [0.1, 0.01], "post": [0.7, 0.01]}},
    }
    (tmp_path / "cross-5way-anil-prototypes-20.json").write_text(json.dumps(stale))
    assert "cross" not in merge_results(tmp_path)["runs"][0]
    fresh = {**stale, "written": "2026-12-01T13:00:00+00:00"}
    (tmp_path / "cross-5way-anil-prototypes-20.json").write_text(json.dumps(fresh))
    assert merge_results(tmp_path)["runs"][0]["cross"]["20-1"]["post"] == [0.7, 0.01]
    # where both carry the checkpoint's fingerprint, it decides: a newer evaluation of another
    # checkpoint in the same folder (a smoke run's, say) is not this row's
    part["runs"][0]["checkpoint_sha256"] = "a" * 64
    (tmp_path / "results-5.json").write_text(json.dumps(part))
    (tmp_path / "cross-5way-anil-prototypes-20.json").write_text(json.dumps({**fresh, "checkpoint_sha256": "b" * 64}))
    assert "cross" not in merge_results(tmp_path)["runs"][0]
    (tmp_path / "cross-5way-anil-prototypes-20.json").write_text(json.dumps({**stale, "checkpoint_sha256": "a" * 64}))
    assert merge_results(tmp_path)["runs"][0]["cross"]["20-1"]["post"] == [0.7, 0.01]


def test_rows_supersede_in_the_order_they_finished_not_their_files(tmp_path: Path) -> None:
    """A process rewrites its file after each run: its file stamp is its last run's, not its first's."""
    a = _part(
        [
            _row(MAML, "5way-maml", 0.80, finished="2026-12-01T10:00:00+00:00"),
            _row(PROTO, "5way-anil-prototypes", 0.95, finished="2026-12-01T14:00:00+00:00"),
        ],
        "2026-12-01T14:00:00+00:00",
    )
    b = _part(
        [_row(MAML, "5way-maml-lr0.003-100it", 0.90, finished="2026-12-01T12:00:00+00:00")], "2026-12-01T12:00:00+00:00"
    )
    (tmp_path / "results-a.json").write_text(json.dumps(a))
    (tmp_path / "results-b.json").write_text(json.dumps(b))
    merged = merge_results(tmp_path)
    maml = [r for r in merged["runs"] if r["run"]["algorithm"] == "maml"]
    assert [r["accuracy"]["1"]["post"][0] for r in maml] == [0.90]
    assert [r["accuracy"]["1"]["post"][0] for r in merged["superseded"]] == [0.80]


def test_a_smoke_run_touches_neither_the_docs_nor_the_record(tmp_path: Path) -> None:
    before = BENCHMARKS.read_bytes(), sorted(p.name for p in RESULTS.iterdir())
    with pytest.raises(SystemExit, match="no result files"):
        main(["--quick", "--report-only", "--out", str(tmp_path)])
    assert (BENCHMARKS.read_bytes(), sorted(p.name for p in RESULTS.iterdir())) == before


def test_training_trajectory_spans_both_phases_of_a_step_decay(tmp_path: Path) -> None:
    def write(path: Path, accs: list[float]) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            "".join(
                json.dumps({"round": i + 1, "train": {"query_accuracy_post": a}}) + "\n" for i, a in enumerate(accs)
            )
        )

    write(tmp_path / "run" / "metrics.jsonl", [0.9] * 40)
    write(tmp_path / "run" / "decay" / "metrics.jsonl", [0.3] * 40)
    traj = training_trajectory(tmp_path / "run")
    assert traj["peak"] == 0.9 and abs(traj["final"] - 0.3) < 1e-12
    assert training_trajectory(tmp_path / "gone") == {}
    # a row recorded without a trajectory gets it from a run folder that still exists
    row = _row(MAML, "run", 0.5)
    del row["trajectory"]
    (tmp_path / "record").mkdir()
    (tmp_path / "record" / "results-5.json").write_text(json.dumps(_part([row], "2026-12-01T10:00:00+00:00")))
    merged = merge_results(tmp_path / "record", tmp_path)
    assert merged["runs"][0]["trajectory"]["peak"] == 0.9
    assert "diverged" in render_markdown(merged)


# -- the runs: one step schedule, not two phases -----------------------------------------------


def test_every_run_is_one_config_with_its_step_schedule() -> None:
    """The old two-phase decay (a second run restarting Adam) is a ``meta.outer_schedule: step`` config."""
    from fedmeta.config import load_config
    from fedmeta.federation.stages import OuterSchedule
    from simulations.bench_glyphs import CONFIG, RUNS, _quick

    assert all("decay_rounds" not in vars(run) for run in RUNS)
    for run in RUNS:
        cfg = load_config(CONFIG, run.overrides())
        assert cfg.federation.rounds == run.iterations == run.rounds
        schedule = OuterSchedule.from_config(cfg)
        if not run.milestones:
            assert cfg.meta.outer_schedule == "constant"
            continue
        (boundary,) = run.milestones
        assert cfg.meta.outer_schedule == "step" and cfg.meta.outer_milestones == (boundary,)
        assert schedule.lr_at(boundary) == run.outer_lr
        assert schedule.lr_at(boundary + 1) == pytest.approx(run.outer_lr * run.gamma)
        assert schedule.lr_at(run.rounds) == pytest.approx(run.outer_lr * run.gamma)
        # a --quick smoke run keeps a (valid) milestone
        quick = load_config(CONFIG, _quick(run).overrides())
        assert quick.federation.rounds == 3 and quick.meta.outer_milestones == (2,)
    # the re-expressed runs keep the old phase boundaries and factors: MAML 5-way was 3000 + 1000 at lr x 0.1
    maml = next(r for r in RUNS if r.algorithm == "maml")
    assert (maml.rounds, maml.milestones, maml.gamma) == (4000, (3000,), 0.1)
    # a continued run starts from its start run's one folder (no "/decay" second phase any more)
    assert all(r.start_from is None or "/" not in r.start_from for r in RUNS)


def test_rows_of_the_retired_two_phase_script_render_as_they_were_and_are_marked() -> None:
    from simulations.bench_glyphs import TWO_PHASE_COMMIT, Run

    old = _row(MAML, "5way-maml", 0.9)
    old["run"] = {**old["run"], "rounds": 300, "decay_rounds": 100, "decay_factor": 0.1}
    old["rounds"] = 400
    del old["run"]["milestones"], old["run"]["gamma"]
    new = _row(Run("Meta-SGD", 5, "metasgd", 400, 32, 0.4, 1, 1, 0.003, milestones=(300,)), "5way-metasgd", 0.9)
    merged = {**_part([old, new], "2026-12-01T10:00:00+00:00"), "superseded": [], "provenance": []}
    markdown = render_markdown(merged)
    assert "| 300 + 100 at lr × 0.1 |" in markdown and "| 400 (lr × 0.1 after 300) |" in markdown
    assert f"retired two-phase script (`simulations/bench_glyphs.py` at commit {TWO_PHASE_COMMIT})" in markdown


def test_numbers_of_a_transcribed_record_are_marked_where_they_appear(tmp_path: Path) -> None:
    part = _part([_row(MAML, "5way-maml", 0.9)], "2026-11-22T10:00:00+00:00")
    part["provenance"] = "reconstructed from an earlier text"
    (tmp_path / "results-old.json").write_text(json.dumps(part))
    markdown = render_markdown(merge_results(tmp_path))
    assert "| 5-way 1-shot | 50.0 ± 1.0ʳ | 90.0 ± 1.0ʳ |" in markdown
    assert "| MAML (2nd order) (reconstructed) |" in markdown and "`results-old.json`" in markdown
