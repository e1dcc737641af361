"""Shared helper: each benchmark script owns one marked section of ``docs/benchmarks.md``."""

from __future__ import annotations

import os
import platform
import re
from datetime import UTC, datetime
from pathlib import Path

import torch

__all__ = ["update_section", "BENCHMARKS", "machine_line"]

BENCHMARKS = Path(__file__).resolve().parents[1] / "docs" / "benchmarks.md"

_HEADER = """# Benchmarks

Every section below is written by the script it names, on the machine it names; rerun the
script to refresh it. Numbers are measured, never typed in. Wall times on these shared 2-core
machines are noisy: compare ratios measured side by side in one run.
"""


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
