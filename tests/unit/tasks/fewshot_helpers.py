"""Shared helpers of the on-disk image-source tests: glyph renders as test data, and the raw-pixel floor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from fedmeta.config import Config
from fedmeta.types import TaskBatch

__all__ = ["glyph_classes", "nearest_neighbour_accuracy", "train_and_compare"]


def glyph_classes(alphabets: dict[str, int], *, size: int, drawings: int) -> list[np.ndarray]:
    """``uint8 [drawings, size, size]`` glyph renders (ink 255) of the first characters of each alphabet, in order."""
    from fedmeta.tasks.glyphs import load_catalog, render_bank

    cat = load_catalog()
    out: list[np.ndarray] = []
    for name, count in alphabets.items():
        rows = np.flatnonzero(cat.alphabet == cat.alphabet_names.index(name))[:count]
        out.extend(render_bank(cat, rows, style=None, image_size=size, drawings=drawings, render_seed=0))
    return out


def nearest_neighbour_accuracy(batch: TaskBatch) -> float:
    """Mean query accuracy of 1-nearest-neighbour on raw pixels (Euclidean) against each task's support set."""
    s = batch.support_x.flatten(2)
    q = batch.query_x.flatten(2)
    nearest = torch.cdist(q, s).argmin(dim=-1)
    predicted = torch.gather(batch.support_y, 1, nearest)
    return float((predicted == batch.query_y).float().mean())


def train_and_compare(cfg: Config, out: Path) -> tuple[dict[str, Any], float]:
    """Meta-train ``cfg`` centrally; return the final evaluation and the raw-pixel floor on the same held-out tasks."""
    from fedmeta.centralized import run_centralized
    from fedmeta.tasks import TaskSource

    final = run_centralized(cfg, out)["final"]
    floor = nearest_neighbour_accuracy(TaskSource(cfg).eval_tasks())
    return final, floor
