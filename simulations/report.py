"""Shared helper: each benchmark script owns one marked section of ``docs/benchmarks.md``."""

from __future__ import annotations

import json
import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "update_section",
    "BENCHMARKS",
    "RESULTS",
    "machine_line",
    "record_dir",
    "save_record",
    "transcribed_part",
    "TRANSCRIBED_NOTE",
]

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"
#: the committed raw records every section is rendered from, one folder per section
RESULTS = BENCHMARKS.parent / "results"

_HEADER = """# Benchmarks

Every section below is written by the script it names, on the machine it names, and rendered
from a committed raw record under `docs/results/<section>/` that it names; rerun the script to
refresh both. Where a run's raw record was not kept, the section's numbers are transcribed from
an earlier version of this page into `docs/results/<section>/*.transcribed.md` and marked as
such where they appear. Wall times on these shared 2-core machines are noisy: compare ratios
measured side by side in one run.
"""

#: how a transcribed part begins (``docs/results/<section>/<part>.transcribed.md``)
TRANSCRIBED_NOTE = "**Transcribed, not re-rendered.**"


def record_dir(section: str) -> Path:
    """The folder of ``section``'s committed raw records (``docs/results/<section>/``)."""
    return RESULTS / section


def save_record(section: str, name: str, data: Any) -> Path:
    """Write one raw record of ``section`` as ``docs/results/<section>/<name>.json`` (committed).

    Args:
        section: the section of docs/benchmarks.md the record renders.
        name: the part's name.
        data: plain JSON-able measurements.

    Returns:
        The file written.
    """
    path = record_dir(section) / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


def transcribed_part(section: str, name: str) -> str | None:
    """The markdown of a part whose raw record was not kept, as transcribed (``<name>.transcribed.md``).

    Returns:
        The text (it begins with :data:`TRANSCRIBED_NOTE` and says where it was copied from and the
        command whose rerun writes the raw record), or ``None`` when no such file exists.
    """
    path = record_dir(section) / f"{name}.transcribed.md"
    return path.read_text(encoding="utf-8").strip() if path.exists() else None


def machine_line() -> str:
    """One line describing where a benchmark ran, with the load other jobs put on the machine."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}, Python {platform.python_version()}, "
        f"{datetime.now(UTC):%Y-%m-%d}, 1-minute load average {load:.1f} when the section was written "
        "(wall times inflate with load; ratios measured side by side do not)"
    )


def update_section(name: str, markdown: str, path: Path = BENCHMARKS) -> Path:
    """Replace (or append) the section ``name`` of ``path`` with ``markdown``.

    The section is delimited by ``<!-- BEGIN name -->`` / ``<!-- END name -->`` markers so that
    several scripts can share the file without overwriting one another.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    text = path.read_text(encoding="utf-8") if path.exists() else _HEADER
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    block = f"{begin}\n{markdown.strip()}\n{end}"
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")
    return path
