"""Shared helper: each benchmark script owns one marked section of ``docs/benchmarks.md``."""

from __future__ import annotations

import platform
import re
from datetime import datetime, timezone
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
    """One line describing where a benchmark ran."""
    return (
        f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
        f"Python {platform.python_version()}, {datetime.now(timezone.utc):%Y-%m-%d}"
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
