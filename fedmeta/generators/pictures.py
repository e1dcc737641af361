"""The generators' pictures (the seed's "curriculum visualization"), drawn from ``metrics.jsonl`` at the end of a run.

* ``task_space.png``: at each evaluation round, the round's virtual tasks in task-parameter space
  (the first two parameters, e.g. amplitude and phase), coloured by their post-adaptation loss at
  that round's initialization, admitted ones as dots and rejected ones as crosses, with the clients'
  declared box drawn in. The server never sees the clients' own tasks, so the box (public config)
  stands for them.
* ``error_by_param.png``: the held-out tasks' loss after adaptation against their first parameter
  (e.g. amplitude), one line per evaluation round, the clients' declared range shaded.

Only runs with a generator (``generators.depth`` 2) record what these need.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = ["MAP_PNG", "ERROR_PNG", "error_by_param", "task_map", "write_generator_pictures"]

MAP_PNG = "task_space.png"
ERROR_PNG = "error_by_param.png"
#: bins of the error-by-parameter curve, and panels of the task-space map at most (the last ones)
BINS = 8
PANELS = 6


def task_map(params: Tensor, difficulty: Tensor, admitted: Sequence[int]) -> dict[str, Any]:
    """The compact record of one round's virtual tasks for the map (what the metrics row keeps).

    Args:
        params: the proposals' parameters ``[n, P]``.
        difficulty: their post-adaptation losses ``[n]``.
        admitted: the indices of the admitted ones.
    """
    keep = set(admitted)
    return {
        "params": [[round(float(v), 5) for v in row] for row in params.double()],
        "difficulty": [round(float(v), 6) for v in difficulty.double()],
        "admitted": [i in keep for i in range(params.shape[0])],
    }


def error_by_param(losses: Tensor, params: Tensor, name: str) -> dict[str, Any]:
    """Held-out loss by bins of the first task parameter: ``{name, edges, loss, tasks}`` (empty bins: NaN)."""
    value = params[:, 0].double()
    lo, hi = float(value.min()), float(value.max())
    edges = torch.linspace(lo, hi, BINS + 1, dtype=torch.float64)
    which = torch.clamp(torch.bucketize(value, edges[1:-1], right=True), 0, BINS - 1)
    loss, tasks = [], []
    for b in range(BINS):
        inside = losses.double()[which == b]
        tasks.append(int(inside.numel()))
        loss.append(float(inside.mean()) if inside.numel() else math.nan)
    return {"name": name, "edges": [float(e) for e in edges], "loss": loss, "tasks": tasks}


def write_generator_pictures(rows: list[dict[str, Any]], out_dir: Path, cfg: Config) -> list[Path]:
    """Draw both pictures from a run's metrics rows; returns the files written (none without the records)."""
    from fedmeta.outputs import pyplot

    maps = [(r["round"], r["generators"]["map"]) for r in rows if "map" in (r.get("generators") or {})]
    curves = [(r["round"], r["eval"]["by_param"]) for r in rows if "by_param" in (r.get("eval") or {})]
    written: list[Path] = []
    plt = pyplot()
    box = _clients_box(cfg)
    if maps:
        maps = maps[-PANELS:]
        fig, axes = plt.subplots(1, len(maps), figsize=(3.2 * len(maps), 3.2), squeeze=False, sharey=True)
        top = max(max(m["difficulty"]) for _, m in maps)
        low = max(1e-6, min(min(m["difficulty"]) for _, m in maps))
        norm = _log_norm(low, max(top, low * 1.01))
        for ax, (r, m) in zip(axes[0], maps):
            pts = torch.tensor(m["params"], dtype=torch.float64)
            y = pts[:, 1] if pts.shape[1] > 1 else torch.zeros(len(pts))
            adm = torch.tensor(m["admitted"], dtype=torch.bool)
            diff = torch.tensor(m["difficulty"], dtype=torch.float64).clamp_min(1e-6)
            ax.scatter(pts[adm, 0], y[adm], c=diff[adm], norm=norm, cmap="viridis", marker="o", s=14)
            ax.scatter(pts[~adm, 0], y[~adm], c=diff[~adm], norm=norm, cmap="viridis", marker="x", s=14)
            if box is not None:
                (x0, x1), (y0, y1) = box
                ax.add_patch(plt.Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, ls="--", color="0.3"))
            ax.set_title(f"round {r}", fontsize=9)
            ax.set_xlabel(_names(cfg)[0])
        axes[0][0].set_ylabel(_names(cfg)[1] if len(_names(cfg)) > 1 else "")
        fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap="viridis"), ax=axes[0].tolist(), label="loss after adapt")
        fig.suptitle("virtual tasks (o admitted, x rejected); dashed: the clients' declared box", fontsize=9)
        written.append(_save(fig, out_dir / MAP_PNG, plt))
    if curves:
        fig, ax = plt.subplots(figsize=(5.5, 3.6))
        for r, c in curves:
            edges = c["edges"]
            centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
            ax.plot(centres, c["loss"], marker=".", label=f"round {r}")
        if box is not None:
            ax.axvspan(*box[0], color="0.9", label="clients' range")
        ax.set_xlabel(curves[-1][1]["name"])
        ax.set_ylabel(f"held-out loss after {cfg.eval.steps} steps")
        ax.set_yscale("log")
        ax.legend(fontsize=7)
        written.append(_save(fig, out_dir / ERROR_PNG, plt))
    return written


def _names(cfg: Config) -> tuple[str, ...]:
    from fedmeta.tasks import build_family
    from fedmeta.tasks.regression import GeneratedRegression

    family = build_family(cfg)
    return family.param_names if isinstance(family, GeneratedRegression) else ("parameter",)


def _clients_box(cfg: Config) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """The clients' declared ranges of the first two task parameters (public config)."""
    from fedmeta.tasks import build_family
    from fedmeta.tasks.regression import GeneratedRegression

    family = build_family(cfg)
    if not isinstance(family, GeneratedRegression):
        return None
    ranges = family.param_ranges()
    first = (float(ranges[0][0]), float(ranges[0][1]))
    second = (float(ranges[1][0]), float(ranges[1][1])) if len(ranges) > 1 else (0.0, 0.0)
    return first, second


def _log_norm(low: float, high: float) -> Any:
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=low, vmax=high)


def _save(fig: Any, path: Path, plt: Any) -> Path:
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
