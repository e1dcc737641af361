"""The run's output directory (SPEC §9): metrics.jsonl, summary.json, checkpoint.pt and PNG plots."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from fedmeta.checkpoint import atomic_write_bytes
from fedmeta.errors import CheckpointError

__all__ = [
    "RunRecorder",
    "pyplot",
    "read_metrics",
    "plot_learning_curves",
    "plot_adaptation_curve",
    "montage_grid",
    "plot_episode_montage",
    "write_episode_montage",
    "EPISODE_PNG",
]

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
CHECKPOINT = "checkpoint.pt"
EPISODE_PNG = "episode.png"


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Read a ``metrics.jsonl`` file (one JSON object per round)."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for line in p.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            rows.append(json.loads(line))
    return rows


def _read_rows_tolerating_a_torn_tail(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if i == len(lines) - 1:  # no newline after it: a write cut short by a crash
                log.warning("%s: dropping a last row cut short by a crash (%d characters)", path, len(line))
                continue
            raise CheckpointError(f"metrics file '{path}', line {i + 1}, is not a JSON row: {exc}") from exc
        rows.append(row)
    return rows


class RunRecorder:
    """Writes a run's outputs into ``out_dir``.

    Args:
        out_dir: the output directory (created if needed).
        resume_round: when resuming, rows after this round are dropped from ``metrics.jsonl`` so
            that nothing is counted twice; ``None`` starts a fresh file.
    """

    def __init__(self, out_dir: str | Path, *, resume_round: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / METRICS
        self.checkpoint_path = self.out_dir / CHECKPOINT
        self.summary_path = self.out_dir / SUMMARY
        if resume_round is None:
            atomic_write_bytes(self.metrics_path, b"")
        else:
            self.drop_rows_after(resume_round)

    def drop_rows_after(self, round_idx: int) -> None:
        """Keep only the rows of rounds up to ``round_idx`` (rewritten atomically).

        A resumed run calls it with its checkpoint's round: rows written for a round whose
        checkpoint was never written (a crash in between) go, and the rerun writes them once. A
        last line cut short by a crash while it was written is dropped too.

        Raises:
            CheckpointError: if a line other than the last is not a JSON row (the file is not
                one this recorder wrote).
        """
        kept = [r for r in _read_rows_tolerating_a_torn_tail(self.metrics_path) if int(r.get("round", 0)) <= round_idx]
        text = "".join(json.dumps(_jsonable(r)) + "\n" for r in kept)
        atomic_write_bytes(self.metrics_path, text.encode())

    def log_round(self, row: dict[str, Any]) -> None:
        """Append one row and ``fsync`` it: on disk before the round's checkpoint is written."""
        with self.metrics_path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps(_jsonable(row)) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def write_summary(self, summary: dict[str, Any]) -> Path:
        """Write ``summary.json`` atomically."""
        atomic_write_bytes(self.summary_path, (json.dumps(_jsonable(summary), indent=2) + "\n").encode())
        return self.summary_path

    def plot(self, final_curve: dict[str, list[float]] | None = None) -> list[Path]:
        """Write the learning-curve PNG (and the adaptation-curve PNG when a final curve is given)."""
        written = [plot_learning_curves(read_metrics(self.metrics_path), self.out_dir / "learning_curves.png")]
        if final_curve:
            written.append(plot_adaptation_curve(final_curve, self.out_dir / "adaptation_curve.png"))
        return written


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no screen needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curves(rows: list[dict[str, Any]], path: Path) -> Path:
    """Training query loss (before/after adaptation) per round and held-out evaluation curves."""
    plt = pyplot()
    train = [r for r in rows if r.get("train")]
    evals = [r for r in rows if r.get("eval")]
    has_acc = any("post_adapt_accuracy" in r["eval"] for r in evals)
    ncols = 3 if has_acc else 2
    fig, axes = plt.subplots(1, ncols, figsize=(5 * ncols, 3.8))
    ax = axes[0]
    if train:
        rounds = [r["round"] for r in train]
        for key, label in (
            ("query_loss_pre", "query loss before adaptation"),
            ("query_loss_post", "query loss after adaptation"),
        ):
            ys = [_num(r["train"].get(key)) for r in train]
            ax.plot(rounds, _smooth(ys), label=label)
        ax.set_yscale("log")
        ax.set_title("training tasks (smoothed)")
        ax.legend(fontsize=8)
    else:
        # under DP clients release no training metrics: show the privacy spent instead
        spent = [r for r in rows if isinstance((r.get("privacy") or {}).get("epsilon"), (int, float))]
        if spent:
            ax.plot(
                [r["round"] for r in spent],
                [r["privacy"]["epsilon"] for r in spent],
                label=f"epsilon (delta={spent[-1]['privacy'].get('delta', 0):g})",
            )
            ax.legend(fontsize=8)
        ax.set_title("privacy spent" if spent else "training tasks")
    ax.set_xlabel("round")
    for ax, metric in zip(axes[1:], ["loss"] + (["accuracy"] if has_acc else [])):
        if evals:
            rounds = [r["round"] for r in evals]
            for stage, label in (("pre_adapt", "before adaptation"), ("post_adapt", "after adaptation")):
                # non-finite values were written as null (a diverged evaluation): leave gaps
                ys = [_num(r["eval"].get(f"{stage}_{metric}")) for r in evals]
                ci = [_num(r["eval"].get(f"{stage}_{metric}_ci95"), 0.0) for r in evals]
                ax.errorbar(rounds, ys, yerr=ci, marker="o", ms=3, capsize=2, label=label)
        ax.set_xlabel("round")
        ax.set_title(f"held-out tasks: {metric} (95% CI)")
        if metric == "loss":
            ax.set_yscale("log")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_adaptation_curve(curves: dict[str, list[float]], path: Path) -> Path:
    """Held-out query metric against the number of inner steps at test time."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.6), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        ax.plot(range(len(values)), [_num(v) for v in values], marker="o")
        ax.set_xlabel("inner steps at test time")
        ax.set_ylabel(name.replace("_", " "))
        ax.set_title(f"adaptation on held-out tasks: {name.replace('_curve', '')}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _num(value: Any, default: float = math.nan) -> float:
    return default if value is None else float(value)


def _smooth(values: list[float], window: int = 0) -> list[float]:
    n = len(values)
    window = window or max(1, n // 50)
    out, acc, q = [], 0.0, []
    for v in values:
        q.append(v)
        acc += v
        if len(q) > window:
            acc -= q.pop(0)
        out.append(acc / len(q))
    return out


def _is_image_batch(x: Any) -> bool:
    return getattr(x, "dim", lambda: 0)() == 4 and int(x.shape[1]) in (1, 3)


def montage_grid(ways: int, cols: int) -> tuple[int, int]:
    """How :func:`plot_episode_montage` lays out ``ways`` class rows of ``cols`` images each.

    The rows wrap into side-by-side blocks so that the picture stays roughly square (an image
    cell is 0.75 wide by 0.8 high): about ``sqrt(ways * cols * 0.75 / 0.8)`` rows per block.

    Args:
        ways: classes (one row each).
        cols: image columns of one class row (support, spacer, queries).

    Returns:
        ``(blocks, rows)``: blocks side by side and rows per block (``blocks * rows >= ways``).
    """
    per_block = max(1, math.ceil(math.sqrt(ways * cols * 0.75 / 0.8)))
    blocks = math.ceil(ways / per_block)
    return blocks, math.ceil(ways / blocks)


def plot_episode_montage(
    support_x: Any,
    support_y: Any,
    query_x: Any,
    query_y: Any,
    predicted: Any,
    path: Path,
    *,
    title: str = "",
    class_names: list[str] | None = None,
    max_query: int = 5,
) -> Path | None:
    """One few-shot episode as a picture: a row per class, its support images, then its queries.

    Each query image is titled with the predicted label, green when right and red when wrong.
    Many classes are laid out as a grid: the rows wrap into side-by-side blocks (one block up
    to about a square picture, e.g. 5 ways; 40 ways: 3 blocks of 14 rows), not one tall column.

    Args:
        support_x, query_x: ``[N, C, H, W]`` image tensors (``C`` 1 or 3, values in [0, 1]).
        support_y, query_y: ``[N]`` integer labels ``0..ways-1``.
        predicted: ``[Nq]`` predicted labels of the queries.
        path: PNG file to write.
        title: figure title.
        class_names: optional name per label (row captions).
        max_query: at most this many queries shown per class.

    Returns:
        ``path``, or ``None`` (nothing written) when the inputs are not images.
    """
    if not (_is_image_batch(support_x) and _is_image_batch(query_x)):
        return None
    plt = pyplot()
    ways = int(max(int(support_y.max()), int(query_y.max()))) + 1
    shots = max(int((support_y == c).sum()) for c in range(ways))
    shown = min(max_query, max(int((query_y == c).sum()) for c in range(ways)))
    cols = shots + 1 + shown
    blocks, rows = montage_grid(ways, cols)
    # a block's columns (support, a spacer, queries), then a wider gap holding the next block's captions
    ratios = ([1.0] * cols + [1.6]) * blocks
    ratios = ratios[:-1]
    fig, axes = plt.subplots(
        rows,
        len(ratios),
        figsize=(max(0.75 * sum(ratios) + 1.2, 6.5), 0.8 * rows + 0.9),
        squeeze=False,
        gridspec_kw={"width_ratios": ratios},
    )

    def show(ax: Any, img: Any) -> None:
        arr = img.detach().cpu().float()
        if arr.shape[0] == 1:
            ax.imshow(arr[0].numpy(), cmap="gray_r", vmin=0.0, vmax=1.0)
        else:
            ax.imshow(arr.permute(1, 2, 0).clamp(0, 1).numpy())

    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
        for side in ax.spines.values():
            side.set_visible(False)
    for c in range(ways):
        row, first = c % rows, (c // rows) * (cols + 1)
        name = class_names[c] if class_names and c < len(class_names) else ""
        axes[row, first].set_ylabel(
            f"{c}: {name}" if name else f"class {c}", rotation=0, ha="right", va="center", fontsize=7
        )
        for j, i in enumerate((support_y == c).nonzero().flatten().tolist()[:shots]):
            show(axes[row, first + j], support_x[i])
        for j, i in enumerate((query_y == c).nonzero().flatten().tolist()[:shown]):
            ax = axes[row, first + shots + 1 + j]
            show(ax, query_x[i])
            ok = int(predicted[i]) == c
            ax.set_title(f"{int(predicted[i])}", fontsize=7, color="tab:green" if ok else "tab:red", pad=1)
            for side in ax.spines.values():
                side.set_visible(True)
                side.set_color("tab:green" if ok else "tab:red")
    for b in range(blocks):
        axes[0, b * (cols + 1)].set_title("support", fontsize=7, loc="left", pad=1)
    import textwrap

    fig.suptitle(textwrap.fill(title or "episode: support | queries (predicted label)", 90), fontsize=8)
    if blocks == 1:
        fig.tight_layout(rect=(0, 0, 1, 0.95))
    else:  # tight_layout cannot fit the inner blocks' captions into their gap columns
        fig.subplots_adjust(left=0.08, right=0.99, bottom=0.02, top=0.92, wspace=0.15, hspace=0.4)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_episode_montage(
    algorithm: Any, meta: dict[str, Any], tasks: Any, path: Path, *, steps: int, caption: str = ""
) -> Path | None:
    """Adapt ``meta`` to the first task of ``tasks`` and draw it with :func:`plot_episode_montage`.

    Args:
        algorithm: a :class:`fedmeta.algorithms.MetaAlgorithm` (decides what adapts and how).
        meta: meta-parameters.
        tasks: a :class:`fedmeta.types.TaskBatch` of kind ``classification``.
        path: PNG file to write.
        steps: inner steps on the support set before predicting the queries.
        caption: prefix of the figure title (e.g. which split the task comes from).

    Returns:
        ``path``, or ``None`` when the task is not image classification.
    """
    import torch

    if tasks.kind != "classification" or tasks.num_tasks == 0 or not _is_image_batch(tasks.support_x[0]):
        return None
    sx, sy, qx, qy = tasks.support_x[0], tasks.support_y[0], tasks.query_x[0], tasks.query_y[0]
    frozen = {k: v.detach() for k, v in meta.items()}
    adapted = algorithm.adapt(frozen, sx, sy, steps, first_order=True)
    with torch.no_grad():
        predicted = algorithm.model.forward({k: v.detach() for k, v in adapted.items()}, qx).argmax(dim=-1)
    accuracy = float((predicted == qy).float().mean())
    ways = int(sy.max()) + 1
    shots = int((sy == 0).sum())
    names = tasks.ids[0].split() if tasks.ids else None
    title = (
        f"{caption}{ways}-way {shots}-shot episode: support | queries, "
        f"predicted label after {steps} steps (accuracy {accuracy:.0%})"
    )
    written = plot_episode_montage(sx, sy, qx, qy, predicted, path, title=title, class_names=names)
    if written is not None:
        log.info("episode montage written to %s", written)
    return written
