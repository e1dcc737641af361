"""Every number in docs/benchmarks.md comes from a committed record under docs/results/, re-rendered where it can be.

A section is rendered from raw records its script wrote (the glyphs and privacy renderers are
run here and must reproduce the committed text), or, where a run's raw record was not kept,
is the transcribed record ``docs/results/<section>/<part>.transcribed.md`` verbatim, which says so.
Every record the docs name exists.
"""

from __future__ import annotations

import re

import pytest

from simulations.report import BENCHMARKS, RESULTS, TRANSCRIBED_NOTE, record_dir

ROOT = BENCHMARKS.parents[1]
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def _sections() -> dict[str, str]:
    text = BENCHMARKS.read_text(encoding="utf-8")
    return {
        m.group(1): m.group(2).strip() for m in re.finditer(r"<!-- BEGIN (\S+) -->\n(.*?)\n<!-- END \1 -->", text, re.S)
    }


def test_every_record_the_docs_name_exists() -> None:
    named = set()
    for doc in DOCS:
        for path in re.findall(r"docs/results/[\w./-]*[\w/]", doc.read_text(encoding="utf-8")):
            named.add(path)
            assert (ROOT / path).exists(), f"{doc.name} names {path}, which is not committed"
    assert "docs/results/glyphs/results-2026-11-22-reconstructed.json" in named


def test_every_section_names_its_committed_record() -> None:
    sections = _sections()
    assert {
        "foundation-accuracy",
        "foundation-speed",
        "federation",
        "new-site",
        "glyphs",
        "privacy",
        "deployment",
    } <= set(sections)
    for name, body in sections.items():
        folder = record_dir(name)
        rel = folder.relative_to(ROOT).as_posix()
        assert rel in body, f"section '{name}' does not say it is rendered from {rel}/"
        assert any(folder.iterdir()), f"section '{name}' has no committed record in {rel}/"


@pytest.mark.parametrize("name", ["foundation-accuracy", "foundation-speed", "federation", "new-site", "deployment"])
def test_a_section_without_raw_records_is_its_transcribed_record_and_says_so(name: str) -> None:
    record = record_dir(name) / f"{name}.transcribed.md"
    if not record.exists():  # rerun since: rendered from the raw record the script committed
        assert any(record_dir(name).glob("*.json"))
        return
    body = _sections()[name]
    assert body == record.read_text(encoding="utf-8").strip()
    assert TRANSCRIBED_NOTE in body and "cannot be re-rendered" in body


def test_the_privacy_section_is_what_its_records_render() -> None:
    from simulations.bench_privacy import section

    assert _sections()["privacy"] == section(record_dir("privacy")).strip(), (
        "docs/benchmarks.md's privacy section differs from its records: `python -m simulations.bench_privacy "
        "--section-only`"
    )


def test_every_transcribed_record_is_marked_as_such() -> None:
    found = sorted(RESULTS.rglob("*.transcribed.md"))
    assert found
    for path in found:
        assert TRANSCRIBED_NOTE in path.read_text(encoding="utf-8"), path
