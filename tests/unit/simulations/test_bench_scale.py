"""The scale benchmark's section is rendered from its raw record, and says what it has not measured."""

from __future__ import annotations

import re
from typing import Any

from simulations.bench_scale import CASES, case_config, read_record, section
from simulations.report import BENCHMARKS


def _entry(case: str, path: str, round_s: float, **extra: Any) -> dict[str, Any]:
    total, per_round = CASES[case]
    return {
        "case": case, "path": path, "clients_total": total, "clients_per_round": per_round, "rounds": 6,
        "round_s": round_s, "startup_s": 10.0 if path == "simulate" else 1.0, "peak_rss_mb": 900.0,
        "machine": "test machine", **extra,
    }  # fmt: skip


def test_the_section_shows_each_measured_case_side_by_side_and_lists_the_missing_ones() -> None:
    record = [
        _entry("overhead-10", "simulate", 0.5, flower_latency_s=0.1, partial_run=True),
        _entry("overhead-10", "centralized", 0.2),
        _entry("overhead-10", "simulate", 0.3, flower_latency_s=0.1, partial_run=True),  # a later run replaces it
        _entry("registered-10k-100", "simulate", 1.0, flower_latency_s=0.2, startup_s=25.0),
        _entry("registered-10k-100", "centralized", 0.4),
        _entry("overhead-100", "simulate", 1.0, flower_latency_s=0.2),  # its reference is missing: not shown
    ]
    text = section(record)
    assert "**Partial run.**" in text and "not measured yet: overhead-100, overhead-1000" in text
    row = next(line for line in text.splitlines() if line.startswith("| overhead-10 |"))
    assert "| 0.3000 | 0.2000 | 1.5× | 1.00× | 0.100 |" in row  # the later run; (0.3 - 0.1) / 0.2
    assert "registered-10k-100 +15.0 s" in text  # start-up beyond the 10-client run's
    assert "docs/results/scale/records.jsonl" in text


def test_the_cases_are_the_issues_sizes() -> None:
    assert {CASES[c] for c in CASES} >= {(10_000, 100), (10_000, 1_000), (1_000_000, 100), (1_000_000, 1_000)}
    assert [CASES[c][1] for c in ("overhead-10", "overhead-100", "overhead-1000")] == [10, 100, 1_000]
    cfg = case_config(1_000_000, 100, 6)
    assert (cfg.meta.tasks_per_client, cfg.privacy.mode, cfg.simulation.pool) == (10, "none", True)


def test_the_committed_section_is_what_the_committed_record_renders() -> None:
    text = BENCHMARKS.read_text(encoding="utf-8")
    found = re.search(r"<!-- BEGIN scale -->\n(.*?)\n<!-- END scale -->", text, re.S)
    assert found, "docs/benchmarks.md has no scale section: python -m simulations.bench_scale --render"
    assert found.group(1).strip() == section(read_record()).strip()
