"""Glyphs benchmark: few-shot accuracy on the held-out alphabets, against the pixel floor and Omniglot.

Writes the ``glyphs`` section of ``docs/benchmarks.md`` (and ``docs/figures/glyphs_episode.png``).
Every process records its results in ``docs/results/glyphs/`` (committed: one file per process
and start, stamped with when it was written, the runs' training curves summarized in it), and
the section is rendered from that whole record, so runs of different sessions add up: a rerun of
a setting supersedes the earlier row, which the report keeps struck through. Checkpoints and
training logs stay in ``--out`` (not kept); runs that continue from a checkpoint need it there.

Usage (the full run takes about an hour on a shared 2-core machine; run it niced, in the
background, with a log)::

    nice -n 10 python -m simulations.bench_glyphs > runs/bench-glyphs.log 2>&1 &
    # or the 5-way and 20-way halves in two processes, then one report from both:
    nice -n 10 python -m simulations.bench_glyphs --only 5 > runs/bench-5.log 2>&1 &
    nice -n 10 python -m simulations.bench_glyphs --only 20 > runs/bench-20.log 2>&1 &
    python -m simulations.bench_glyphs --report-only
    python -m simulations.bench_glyphs --quick --no-write     # a few-minute smoke run (results in --out)
    # rerun some algorithms only (their rows supersede the earlier ones in the report):
    nice -n 10 python -m simulations.bench_glyphs --only 5 --algorithms anil --no-write > runs/bench-5-anil.log 2>&1 &
    # ANIL with prototype heads (continues from the ANIL checkpoints above), then the
    # 20-way-trained model on 5-way episodes:
    nice -n 10 python -m simulations.bench_glyphs --only 20 --algorithms anil-prototypes --no-write \
        > runs/bench-20-proto.log 2>&1 &
    python -m simulations.bench_glyphs --only 20 --algorithms anil-prototypes --evaluate-at 5
    # time the meta-gradient formulations (about 8 minutes), then rewrite the section:
    nice -n 10 python -m simulations.bench_glyphs --speed

What it does, all centralized (``fedmeta.centralized.run_centralized``, the reference path of
``fedmeta centralized``), IID over every background alphabet:

1. Render throughput: the whole drawing bank rendered from scratch into an empty cache folder,
   then loaded again from the cache (what a second run pays), and episodes assembled per second.
2. For 5-way and 20-way, one meta-training run per algorithm (MAML, Meta-SGD, ANIL) with the
   iteration counts of :data:`RUNS`, chosen to fit the time budget of this machine; whether MAML
   is second- or first-order is in the table. 5-way models are trained on 1-shot episodes and
   evaluated at 1 and 5 shots.
3. 600 evaluation episodes per setting from the evaluation alphabets only (15 queries per class
   for 5-way, 5 for 20-way), the same episodes for every method: the raw-pixel nearest-neighbour
   floor (1-NN, Euclidean, over the support images) and each meta-learned initialization after
   its test-time adaptation steps, with 95% confidence intervals over episodes.
4. With ``--speed``: the per-task meta-gradient of one training meta-batch, timed for each way
   of computing it (a Python loop over tasks, ``vmap`` with and without ``functional_call``,
   the batched eager pass, channels-last, two threads), interleaved, medians of 5.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.func import vmap

from fedmeta.algorithms import ALGORITHMS
from fedmeta.algorithms.base import MetaAlgorithm, task_accuracies
from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import file_sha256, load_checkpoint
from fedmeta.config import Config, load_config
from fedmeta.evaluation import mean_ci95
from fedmeta.experiment import Experiment
from fedmeta.models.base import FunctionalModel
from fedmeta.models.conv4 import Conv4
from fedmeta.outputs import read_metrics, write_episode_montage
from fedmeta.rng import make_generator
from fedmeta.tasks.glyphs import GlyphFamily, build_glyph_family, load_bank, load_catalog
from fedmeta.types import Params, TaskBatch, model_part
from simulations.report import machine_line, update_section

__all__ = ["main", "RUNS", "nearest_neighbour_accuracy", "episode_accuracy"]

log = logging.getLogger("bench_glyphs")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "glyphs.yaml"
#: The record of every benchmark run's results (committed; the report is rebuilt from it, while
#: checkpoints and training logs stay in ``--out``, which is not kept)
RESULTS = ROOT / "docs" / "results" / "glyphs"
FIGURE = ROOT / "docs" / "figures" / "glyphs_episode.png"
SAMPLES = ROOT / "docs" / "figures" / "glyphs_alphabets.png"

#: MAML on Omniglot (Finn et al., 2017, Table 1): 5-way 1-shot, 5-way 5-shot, 20-way 1-shot.
OMNIGLOT_MAML = {(5, 1): 98.7, (5, 5): 99.9, (20, 1): 95.8}
EPISODES = 600
QUERIES = {5: 15, 20: 5}
EVAL_SHOTS = {5: (1, 5), 20: (1,)}
#: the last commit of this script that trained a step decay as two runs (a second phase that
#: restarted Adam from the first's final meta-parameters, with fresh tasks from seed + 1, in
#: ``<run>/decay/``); result rows with ``decay_rounds`` come from it and are kept as they are
TWO_PHASE_COMMIT = "72205bd"
#: the mark of a number transcribed from an earlier text (a result file with a ``provenance``)
TRANSCRIBED = "ʳ"
#: markers of the table's footnotes (models evaluated at a number of ways they were not trained on)
FOOTNOTES = ("†", "‡", "§", "¶")


@dataclass(frozen=True)
class Run:
    """One meta-training run of the benchmark."""

    label: str
    ways: int
    algorithm: str
    rounds: int
    meta_batch: int
    inner_lr: float
    inner_steps: int
    eval_steps: int
    outer_lr: float
    query: int = 1
    #: a step decay of the outer lr (``meta.outer_schedule: step``): ``outer_lr * gamma`` after
    #: each of these iterations, in one run (Adam's moments carry on). The retired two-phase
    #: script (:data:`TWO_PHASE_COMMIT`) ran a second run instead, with a fresh Adam and fresh
    #: tasks; its result rows carry ``decay_rounds`` / ``decay_factor``.
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    #: further test-time step counts reported besides ``eval_steps``
    extra_eval_steps: tuple[int, ...] = ()
    #: ANIL only: where the head's adaptation starts (``meta.head_init``)
    head_init: str = "learned"
    #: continue from the final meta-parameters of this earlier run (its output folder under
    #: ``--out``) instead of the seed's initialization; its iterations count towards the total
    start_from: str | None = None
    start_iterations: int = 0
    #: other numbers of ways this run's model is also evaluated at (a way-agnostic head only:
    #: ``head_init`` zero or prototypes; the stored head is not used)
    also_eval_ways: tuple[int, ...] = ()
    #: meta-train on episodes of this many ways instead of ``ways`` (way-agnostic heads only;
    #: Prototypical Networks train with more ways than they test, Snell et al., 2017)
    train_ways: int | None = None
    #: tells this run's model apart from another of the same algorithm, head and ways (its
    #: ``--algorithms`` name and its result row's key carry it, e.g. ``anil-prototypes-scratch``)
    tag: str = ""

    @property
    def iterations(self) -> int:
        """Meta-iterations of the run (its own, not those of the run it continues)."""
        return self.rounds

    @property
    def way_agnostic(self) -> bool:
        """Whether this run's model rebuilds its head for each support set (serves any number of ways)."""
        return ALGORITHMS.get(self.algorithm).serves_any_ways(head_init=self.head_init)

    @property
    def variant(self) -> str:
        """The algorithm with its head initialization (and tag, training ways): what a row of the table stands for."""
        return _variant(self.__dict__)

    def overrides(self) -> list[str]:
        """The ``--set`` overrides of ``configs/glyphs.yaml`` that make this run's config."""
        return [
            f"task.ways={self.train_ways or self.ways}",
            "task.shots=1",
            f"task.query={self.query}",
            "task.partition=iid",
            f"meta.algorithm={self.algorithm}",
            f"meta.head_init={self.head_init}",
            f"meta.inner_lr={self.inner_lr}",
            f"meta.inner_steps={self.inner_steps}",
            f"meta.outer_lr={self.outer_lr}",
            f"meta.tasks_per_client={self.meta_batch}",
            "federation.clients_total=1",
            "federation.clients_per_round=1",
            f"federation.rounds={self.rounds}",
            *(
                [
                    "meta.outer_schedule=step",
                    f"meta.outer_milestones=[{', '.join(map(str, self.milestones))}]",
                    f"meta.outer_gamma={self.gamma}",
                ]
                if self.milestones
                else []
            ),
            # the run's own periodic evaluation is kept small; the benchmark evaluates 600 episodes
            "eval.tasks=20",
            f"eval.steps={self.eval_steps}",
            f"eval.every={self.rounds}",
        ]


#: The runs, sized for roughly an hour of a shared 2-core machine. MAML's Omniglot recipe: one
#: inner step of 0.4 for 5-way, five of 0.1 for 20-way, 3 / 5 steps at test time. Meta-SGD is
#: evaluated with the single step its per-parameter rates were learned for (Li et al., 2017).
RUNS: tuple[Run, ...] = (
    # MAML and Meta-SGD: 4,000 iterations each (the batched path made them ~1.4-1.6x cheaper than
    # the first 1,200-iteration runs, which the report keeps as superseded rows), the last quarter
    # at a tenth of the outer lr
    Run("MAML (2nd order)", 5, "maml", 4000, 32, 0.4, 1, 3, 0.003, milestones=(3000,)),
    Run("Meta-SGD", 5, "metasgd", 4000, 32, 0.4, 1, 1, 0.003, milestones=(3000,)),
    # ANIL runs longer than the others (the batched path made it ~1.0-1.5x cheaper per iteration,
    # and it is the best of the three here), then a tenth of the outer lr for the last sixth;
    # 25 test steps because more head steps kept helping the earlier 5,000-iteration model
    # (10 steps also reported)
    Run("ANIL", 5, "anil", 22000, 32, 0.4, 5, 25, 0.003, milestones=(20000,), extra_eval_steps=(10,)),
    # 2,000 iterations at 20-way (outer lr 0.001: ANIL diverged at 0.003 here)
    Run("MAML (1st order)", 20, "fomaml", 2000, 16, 0.1, 5, 5, 0.001, milestones=(1500,), gamma=0.3),
    Run("Meta-SGD", 20, "metasgd", 2000, 16, 0.1, 1, 1, 0.001, milestones=(1500,), gamma=0.3),
    # at outer lr 0.003 this run diverged after ~1000 iterations (the report keeps that attempt)
    Run("ANIL", 20, "anil", 8000, 16, 0.1, 10, 25, 0.001, milestones=(4000,), gamma=0.3, extra_eval_steps=(10,)),
    # ANIL whose head starts at the support prototypes (Proto-MAML's initialization, Triantafillou
    # et al., 2020), continued from the ANIL runs above: way-agnostic, and the body learns a metric
    Run(
        "ANIL, prototype head",
        5,
        "anil",
        5000,
        32,
        0.4,
        5,
        25,
        0.001,
        milestones=(4000,),
        head_init="prototypes",
        start_from="5way-anil-lr0.003-22000it",
        start_iterations=22000,
        extra_eval_steps=(1, 100),
    ),
    Run(
        "ANIL, prototype head",
        20,
        "anil",
        4000,
        16,
        0.1,
        10,
        25,
        0.0005,
        milestones=(3000,),
        gamma=0.3,
        head_init="prototypes",
        start_from="20way-anil-lr0.001-8000it",
        start_iterations=8000,
        extra_eval_steps=(1, 100),
    ),
    # the same, meta-trained on 40-way episodes (more ways in training than at test, as
    # Prototypical Networks do), evaluated at 20 and 5 ways
    Run(
        "ANIL, prototype head",
        20,
        "anil",
        4000,
        8,
        0.1,
        10,
        25,
        0.0005,
        milestones=(3000,),
        gamma=0.3,
        head_init="prototypes",
        start_from="20way-anil-lr0.001-8000it",
        start_iterations=8000,
        extra_eval_steps=(1,),
        train_ways=40,
        also_eval_ways=(5,),
    ),
    # the prototype-head recipe without the long learned-head ANIL start (what a new user would
    # run): from the seed's initialization, 5-way and 40-way (evaluated at 20 and 5 ways)
    Run(
        "ANIL, prototype head (from scratch)",
        5,
        "anil",
        7000,
        32,
        0.4,
        5,
        25,
        0.001,
        milestones=(6000,),
        head_init="prototypes",
        tag="scratch",
        extra_eval_steps=(1,),
    ),
    Run(
        "ANIL, prototype head (from scratch)",
        20,
        "anil",
        5000,
        8,
        0.1,
        10,
        25,
        0.001,
        milestones=(4000,),
        gamma=0.3,
        head_init="prototypes",
        tag="scratch",
        extra_eval_steps=(1,),
        train_ways=40,
        also_eval_ways=(5,),
    ),
    # Prototypical Networks (Snell et al., 2017): no inner loop (inner lr and steps are ignored,
    # as are test-time steps), trained with more ways than tested (20-way, 5 queries per class, 4
    # episodes per iteration), from the seed's initialization
    Run("ProtoNets", 5, "protonet", 3000, 4, 0.4, 1, 1, 0.001, milestones=(2500,), query=5, train_ways=20),
)


def _quick(run: Run) -> Run:
    """A few-round version of ``run`` for ``--quick``: a step schedule keeps one milestone (round 2)."""
    return replace(run, rounds=3, meta_batch=2, milestones=(2,) if run.milestones else ())


class _Continued(Experiment):
    """An experiment whose round-0 meta-parameters are given (a run that continues another's)."""

    def __init__(self, cfg: Config, start: Params) -> None:
        super().__init__(cfg)
        self._start = {k: v.detach().clone() for k, v in start.items()}

    def initial_meta_params(self) -> Params:
        return {k: v.clone() for k, v in self._start.items()}


def nearest_neighbour_accuracy(tasks: TaskBatch) -> torch.Tensor:
    """Per-episode accuracy of 1-nearest-neighbour on raw pixels (Euclidean) over the support set."""
    s = tasks.support_x.flatten(2)
    q = tasks.query_x.flatten(2)
    nearest = torch.cdist(q, s).argmin(dim=-1)
    predicted = torch.gather(tasks.support_y, 1, nearest)
    return (predicted == tasks.query_y).float().mean(dim=1)


def episode_accuracy(
    algo: MetaAlgorithm, meta: Params, tasks: TaskBatch, *, steps: int, batch: int = 50
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-episode query accuracy before and after ``steps`` inner steps on the support set.

    The same adaptation as :func:`fedmeta.evaluation.evaluate` (``algo.adapt``: all parameters
    for MAML, with the learned rates for Meta-SGD, the head for ANIL), but the query set is only
    scored before and after, not after every step. With a model that batches tasks natively
    the chunk is adapted in one batched pass (:meth:`MetaAlgorithm.adapt_tasks`, the same
    numbers), else with ``vmap``.
    """
    pre, posts = episode_accuracies(algo, meta, tasks, steps=(steps,), batch=batch)
    return pre, posts[steps]


def episode_accuracies(
    algo: MetaAlgorithm, meta: Params, tasks: TaskBatch, *, steps: tuple[int, ...], batch: int = 50
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """:func:`episode_accuracy` after each of several step counts (one adaptation, scored on the way)."""
    frozen = {k: v.detach() for k, v in meta.items()}
    # a head that starts from the support set (ANIL's zero / prototypes, ProtoNets) is rebuilt
    # by every adaptation call, so each step count adapts from the start rather than continuing
    restart = algo.rebuilds_head
    if not algo.model.batched_tasks:
        pre, _ = _episode_accuracy_vmap(algo, frozen, tasks, steps=1, batch=batch)
        return pre, {s: _episode_accuracy_vmap(algo, frozen, tasks, steps=s, batch=batch)[1] for s in steps}
    pres: list[torch.Tensor] = []
    posts: dict[int, list[torch.Tensor]] = {s: [] for s in steps}
    with torch.no_grad():
        for start in range(0, tasks.num_tasks, batch):
            chunk = tasks.slice(start, start + batch)
            stacked = {k: v.unsqueeze(0).expand(chunk.num_tasks, *v.shape) for k, v in frozen.items()}
            start = model_part(stacked)
            if restart:
                h = algo.model.features_tasks(start, chunk.support_x)
                start = {**start, **algo.start_head({k: start[k] for k in algo.model.head_keys()}, h, chunk.support_y)}
            pres.append(task_accuracies(algo.model.forward_tasks(start, chunk.query_x), chunk.query_y))
            done, current = 0, stacked
            for s in sorted(steps):
                if restart:
                    adapted, _ = algo.adapt_tasks(stacked, chunk.support_x, chunk.support_y, s, first_order=True)
                else:
                    adapted, _ = algo.adapt_tasks(current, chunk.support_x, chunk.support_y, s - done, first_order=True)
                current = {**current, **adapted}
                done = s
                posts[s].append(task_accuracies(algo.model.forward_tasks(adapted, chunk.query_x), chunk.query_y))
    return torch.cat(pres), {s: torch.cat(v) for s, v in posts.items()}


def run_folder(run: Run, *, chosen: bool) -> str:
    """A run's output folder under ``--out``: reruns of chosen algorithms carry their lr and iterations."""
    return f"{run.ways}way-{run.variant}" + (f"-lr{run.outer_lr:g}-{run.iterations}it" if chosen else "")


def _final_checkpoint(out: Path) -> Path:
    """A run folder's final checkpoint: in ``decay/`` in a folder of the retired two-phase script."""
    second_phase = out / "decay" / "checkpoint.pt"
    return second_phase if second_phase.exists() else out / "checkpoint.pt"


def evaluate_elsewhere(run: Run, folder: Path, ways: int, base: Config, episodes: int, record: Path) -> dict[str, Any]:
    """Evaluate a finished run's final checkpoint (in ``folder``) at ``ways`` (``--evaluate-at``).

    Writes ``cross-<run folder>-<ways>.json`` to ``record``, stamped with the time it was written
    (a result row finished after it is a retrained model, which the evaluation does not describe).
    """
    for name in (run_folder(run, chosen=True), run_folder(run, chosen=False)):
        final = _final_checkpoint(folder / name)
        if final.exists():
            break
    else:
        log.warning(
            "run '%s' (%d-way, %s) has no checkpoint in %s: train it first (--only %d --algorithms %s)",
            run.label,
            run.ways,
            run.variant,
            folder,
            run.ways,
            run.variant,
        )
        return {}
    meta = load_checkpoint(final)["meta_params"]
    digest = file_sha256(final)
    cross: dict[str, Any] = {}
    for shots in EVAL_SHOTS[ways]:
        t0 = time.perf_counter()
        batch = _eval_family(base, ways, shots).sample(
            make_generator(base.seed, "bench-glyphs", ways, shots), episodes, "eval"
        )
        pre, post = cross_way_accuracy(run, meta, ways, batch)
        cross[f"{ways}-{shots}"] = {
            "pre": mean_ci95(pre),
            "post": mean_ci95(post),
            "eval_seconds": time.perf_counter() - t0,
        }
        log.info(
            "%s (trained %d-way) at %d-way %d-shot: %s",
            run.label,
            run.train_ways or run.ways,
            ways,
            shots,
            _fmt(*mean_ci95(post)),
        )
    record.mkdir(parents=True, exist_ok=True)
    (record / f"cross-{name}-{ways}.json").write_text(
        json.dumps({"out": name, "written": _now(), "checkpoint_sha256": digest, "cross": cross}, indent=1) + "\n"
    )
    return cross


def cross_way_accuracy(run: Run, meta: Params, ways: int, tasks: TaskBatch) -> tuple[torch.Tensor, torch.Tensor]:
    """Accuracy of a model with a way-agnostic head (ANIL from zero / prototypes) on ``ways``-way episodes."""
    pre, posts = _accuracies_at(run, meta, ways, tasks, (run.eval_steps,))
    return pre, posts[run.eval_steps]


def _accuracies_at(
    run: Run, meta: Params, ways: int, tasks: TaskBatch, steps: tuple[int, ...]
) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
    """:func:`episode_accuracies` of a run's model on ``ways``-way episodes, whatever ways it trained on.

    At another number of ways the model is built for ``ways`` outputs with a zero stored head:
    a way-agnostic head does not use it (it starts from the support set), only its shape.
    """
    trained = meta[next(k for k in meta if k.endswith("head.weight"))].shape[0]
    if ways != trained and not run.way_agnostic:
        raise ValueError(f"run '{run.label}' has a learned head, which is tied to the {trained} ways it was trained on")
    exp = Experiment(load_config(CONFIG, replace(run, ways=ways, train_ways=None).overrides()))
    if ways != trained:
        shapes = exp.model.param_shapes
        meta = {k: (torch.zeros(shapes[k]) if k in exp.model.head_keys() else v) for k, v in meta.items()}
    return episode_accuracies(exp.algorithm, meta, tasks, steps=steps)


def _episode_accuracy_vmap(
    algo: MetaAlgorithm, frozen: Params, tasks: TaskBatch, *, steps: int, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    def one(
        sx: torch.Tensor, sy: torch.Tensor, qx: torch.Tensor, qy: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        adapted = algo.adapt(frozen, sx, sy, steps, first_order=True)
        # where the adaptation starts (the model's own head, or ANIL's zero / prototype head)
        pre = algo.adaptation_curve(frozen, sx, sy, qx, qy, 0)["query_accuracy"][0]
        post = (algo.model.forward(adapted, qx).argmax(-1) == qy).float().mean()
        return pre, post

    fn = vmap(one)
    pres, posts = [], []
    for start in range(0, tasks.num_tasks, batch):
        chunk = tasks.slice(start, start + batch)
        pre, post = fn(chunk.support_x, chunk.support_y, chunk.query_x, chunk.query_y)
        pres.append(pre.detach())
        posts.append(post.detach())
    return torch.cat(pres), torch.cat(posts)


def _eval_family(cfg: Config, ways: int, shots: int) -> GlyphFamily:
    t = replace(cfg.task, ways=ways, shots=shots, query=QUERIES[ways], partition="iid")
    fam = build_glyph_family(replace(cfg, task=t))
    assert isinstance(fam, GlyphFamily)
    return fam


def render_throughput(cfg: Config) -> dict[str, float]:
    """Images per second: a cold render of the whole bank, a warm load from cache, episode assembly."""
    catalog = load_catalog()
    everything = np.arange(len(catalog))
    t = cfg.task
    folder = Path(tempfile.mkdtemp(prefix="glyph-bench-cache-"))
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        bank = load_bank(
            catalog,
            everything,
            style=None,
            image_size=t.image_size,
            drawings=t.drawings,
            render_seed=t.render_seed,
            folder=folder,
        )
        cold, cold_cpu = time.perf_counter() - t0, time.process_time() - c0
        images = int(bank.shape[0] * bank.shape[1])
        del bank
        t0 = time.perf_counter()
        load_bank(
            catalog,
            everything,
            style=None,
            image_size=t.image_size,
            drawings=t.drawings,
            render_seed=t.render_seed,
            folder=folder,
        )
        warm = time.perf_counter() - t0
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    fam = _eval_family(cfg, 5, 1)
    gen = make_generator(0, "bench-throughput")
    t0, c0 = time.perf_counter(), time.process_time()
    batch = fam.sample(gen, 500, "train")
    assemble, assemble_cpu = time.perf_counter() - t0, time.process_time() - c0
    per_episode = batch.support_x.shape[1] + batch.query_x.shape[1]
    return {
        "images": images,
        "cold_seconds": cold,
        "cold_images_per_second": images / cold,
        "cold_cpu_seconds": cold_cpu,
        "cold_images_per_cpu_second": images / cold_cpu,
        "warm_seconds": warm,
        "episode_images_per_second": 500 * per_episode / assemble,
        "episode_images_per_cpu_second": 500 * per_episode / assemble_cpu,
    }


def plot_samples(cfg: Config, path: Path) -> Path:
    """A picture of the data: one character per background and evaluation alphabet, and drawings of one."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fam = _eval_family(cfg, 5, 1)
    cat = fam.catalog
    rows = []
    for split in ("train", "eval"):
        for a in cat.alphabets(split):
            members = np.flatnonzero(cat.alphabet == a)
            rows.append((cat.alphabet_names[a], split, members[:: max(1, len(members) // 8)][:8]))
    fig, axes = plt.subplots(len(rows), 8, figsize=(8 * 0.6 + 2.2, len(rows) * 0.6 + 0.4), squeeze=False)
    for r, (name, split, members) in enumerate(rows):
        pool = fam._pools[split]
        for c in range(8):
            ax = axes[r, c]
            ax.set_xticks([])
            ax.set_yticks([])
            for side in ax.spines.values():
                side.set_visible(False)
            if c < len(members):
                ax.imshow(pool.images[pool.row[members[c]], 0], cmap="gray_r", vmin=0, vmax=255)
        axes[r, 0].set_ylabel(
            f"{name}{' (eval)' if split == 'eval' else ''}", rotation=0, ha="right", va="center", fontsize=7
        )
    fig.suptitle("glyphs: characters of every alphabet (first drawing of each)", fontsize=8)
    fig.tight_layout(rect=(0, 0, 1, 0.99))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def episode_figure(exp: Experiment, meta: Params, tasks: TaskBatch, run: Run) -> Path | None:
    """The docs picture: the first benchmark episode with the adapted model's predictions."""
    FIGURE.parent.mkdir(parents=True, exist_ok=True)
    return write_episode_montage(
        exp.algorithm, meta, tasks.slice(0, 1), FIGURE, steps=run.eval_steps, caption=f"{run.label}, held-out "
    )


def _train(run: Run, out: Path, quick: bool) -> tuple[Experiment, Params, dict[str, Any]]:
    cfg = load_config(CONFIG, run.overrides())
    exp = Experiment(cfg)
    if run.start_from is not None:
        start = out.parent / run.start_from / "checkpoint.pt"
        if quick:
            # a --quick run's start is the --quick run of the same setting (no lr and iterations in its name)
            start = out.parent / re.sub(r"-lr[^/]*?-\d+it", "", run.start_from) / "checkpoint.pt"
        if not start.exists():
            raise SystemExit(
                f"run '{run.label}' ({run.ways}-way) continues from '{start}', which does not exist: run that one first"
            )
        if (start.parent / "decay" / "checkpoint.pt").exists():
            # its top-level checkpoint is the end of the first phase, not the run's final model
            raise SystemExit(
                f"run '{run.label}' ({run.ways}-way) would continue from '{start.parent}', a run folder of the retired "
                f"two-phase script (commit {TWO_PHASE_COMMIT}): rerun that setting with this script first"
            )
        params = load_checkpoint(start)["meta_params"]
        shapes = exp.model.param_shapes
        wrong = [k for k in params if k in shapes and tuple(params[k].shape) != shapes[k]]
        if wrong and (not run.way_agnostic or set(wrong) - set(exp.model.head_keys())):
            raise SystemExit(f"run '{run.label}' cannot continue from '{start}': parameters {wrong} have other shapes")
        # a way-agnostic head is not used, only its shape: a zero one of this run's number of ways
        params = {k: (torch.zeros(shapes[k]) if k in wrong else v) for k, v in params.items()}
        exp = _Continued(cfg, params)
    t0, c0 = time.perf_counter(), time.process_time()
    summary = run_centralized(cfg, out, experiment=exp)
    rows = read_metrics(out / "metrics.jsonl")
    train_seconds = sum(r.get("seconds", 0.0) for r in rows if r.get("round", 0) > 0)
    meta = load_checkpoint(out / "checkpoint.pt")["meta_params"]
    rounds = summary["rounds_completed"]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    log.info("%s %d-way: %d rounds, %.0f s training", run.label, run.ways, rounds, train_seconds)
    info = {
        "wall_seconds": wall,
        "cpu_seconds": cpu,
        "train_seconds": train_seconds,
        "rounds": rounds,
        "summary_final": summary["final"],
        # how the per-task meta-gradients were computed (docs/glyphs.md, "Speed")
        "path": "batched" if exp.model.batched_tasks else "vmap",
        "threads": torch.get_num_threads(),
        # which model the row describes (a cross-way evaluation must be of this very checkpoint)
        "checkpoint_sha256": file_sha256(out / "checkpoint.pt"),
    }
    if run.start_from is not None:
        info["start_checkpoint"] = {"path": str(start.relative_to(out.parent)), "sha256": file_sha256(start)}
    return exp, meta, info


# -- speed of the per-task meta-gradient -------------------------------------------------------


@dataclass(frozen=True)
class SpeedSetting:
    """One meta-batch shape whose meta-gradient is timed (the shapes of the training runs)."""

    label: str
    ways: int
    algorithm: str
    inner_steps: int
    inner_lr: float
    meta_batch: int
    query: int


#: Second order (MAML, Meta-SGD, ANIL through its head steps) and first order, 5-way and 20-way
#: 1-shot, with the meta-batches of :data:`RUNS`; 5 queries per class once (configs/glyphs.yaml).
SPEED_SETTINGS: tuple[SpeedSetting, ...] = (
    SpeedSetting("MAML 2nd order, 5-way, 1 query/class", 5, "maml", 1, 0.4, 32, 1),
    SpeedSetting("MAML 2nd order, 5-way, 5 queries/class", 5, "maml", 1, 0.4, 32, 5),
    SpeedSetting("MAML 1st order, 5-way, 1 step", 5, "fomaml", 1, 0.4, 32, 1),
    SpeedSetting("ANIL, 5-way, 5 head steps", 5, "anil", 5, 0.4, 32, 1),
    SpeedSetting("Meta-SGD (2nd order), 20-way", 20, "metasgd", 1, 0.1, 16, 1),
    SpeedSetting("MAML 1st order, 20-way, 5 steps", 20, "fomaml", 5, 0.1, 16, 1),
    SpeedSetting("ANIL, 20-way, 10 head steps", 20, "anil", 10, 0.1, 16, 1),
)

#: The formulations compared, in table order; "vmap + functional_call" is the path before the
#: batched one (the speedups are relative to it).
SPEED_VARIANTS = (
    "loop over tasks",
    "vmap + functional_call",
    "vmap",
    "batched",
    "batched, channels_last",
    "batched, 2 threads",
)


class _Conv4FunctionalCall(Conv4):
    """Conv-4 with the committed ``functional_call`` forward and no batched path (the old vmap path)."""

    batched_tasks = False

    def forward(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return FunctionalModel.forward(self, params, x)

    def features(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        return FunctionalModel.features(self, params, x)

    def head(self, params: Params, h: torch.Tensor) -> torch.Tensor:
        return FunctionalModel.head(self, params, h)


class _Conv4ChannelsLast(Conv4):
    """Conv-4's batched pass with the folded images in channels-last memory format."""

    def features_tasks(self, params: Params, x: torch.Tensor) -> torch.Tensor:
        tasks, n = x.shape[0], x.shape[1]
        folded = (
            x.transpose(0, 1).reshape(n, tasks * x.shape[2], *x.shape[3:]).contiguous(memory_format=torch.channels_last)
        )
        return self._body(params, folded, tasks).view(n, tasks, -1).transpose(0, 1)


def _timed(fn: Any, threads: int) -> tuple[float, float]:
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        return time.perf_counter() - t0, time.process_time() - c0
    finally:
        torch.set_num_threads(previous)


def measure_speed(setting: SpeedSetting, *, repeats: int = 5) -> dict[str, Any]:
    """Median wall and CPU seconds of one meta-batch's per-task meta-gradients, per formulation.

    Every formulation computes the same ``[T, *shape]`` gradients of the same meta-batch; they
    run interleaved (one of each per repeat, after a warm-up), so load from other jobs hits
    them alike. Also records how far the batched gradients are from the vmapped ones in float32.
    """
    run = Run(
        setting.label,
        setting.ways,
        setting.algorithm,
        1,
        setting.meta_batch,
        setting.inner_lr,
        setting.inner_steps,
        1,
        0.001,
        query=setting.query,
    )
    cfg = load_config(CONFIG, run.overrides())
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    tasks = exp.source.client_tasks(1, 0)
    model = exp.model
    assert isinstance(model, Conv4)
    kw = {"kind": exp.kind, "inner_lr": setting.inner_lr, "inner_steps": setting.inner_steps}
    cls = type(exp.algorithm)
    old = cls(
        _Conv4FunctionalCall(
            model.input_shape, model.outputs, channels=model.channels, norm=model.norm, pool=model.pool
        ),
        **kw,
    )
    cl = cls(
        _Conv4ChannelsLast(model.input_shape, model.outputs, channels=model.channels, norm=model.norm, pool=model.pool),
        **kw,
    )
    algo = exp.algorithm

    def loop() -> None:
        for t in range(tasks.num_tasks):
            algo.task_update(meta, tasks.support_x[t], tasks.support_y[t], tasks.query_x[t], tasks.query_y[t])

    variants: dict[str, tuple[Any, int]] = {
        "loop over tasks": (loop, 1),
        "vmap + functional_call": (lambda: old.vmapped_task_updates(meta, tasks), 1),
        "vmap": (lambda: algo.vmapped_task_updates(meta, tasks), 1),
        "batched": (lambda: algo.batched_task_updates(meta, tasks), 1),
        "batched, channels_last": (lambda: cl.batched_task_updates(meta, tasks), 1),
        "batched, 2 threads": (lambda: algo.batched_task_updates(meta, tasks), 2),
    }
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in variants}
    for fn, threads in variants.values():
        _timed(fn, threads)  # warm-up
    for _ in range(repeats):
        for name, (fn, threads) in variants.items():
            samples[name].append(_timed(fn, threads))
    g_batched, _ = algo.batched_task_updates(meta, tasks)
    g_vmap, _ = old.vmapped_task_updates(meta, tasks)
    rel = max(float((g_batched[k] - g_vmap[k]).norm() / g_vmap[k].norm().clamp_min(1e-30)) for k in g_vmap)
    out: dict[str, Any] = {
        "setting": setting.__dict__,
        "tasks": tasks.num_tasks,
        "repeats": repeats,
        "float32_rel_diff": rel,
        "variants": {},
    }
    for name, values in samples.items():
        walls, cpus = sorted(v[0] for v in values), sorted(v[1] for v in values)
        out["variants"][name] = {"wall": walls[len(walls) // 2], "cpu": cpus[len(cpus) // 2]}
    log.info("speed %s: %s", setting.label, {k: f"{v['cpu']:.3f}" for k, v in out["variants"].items()})
    return out


def render_speed(speed: dict[str, Any]) -> list[str]:
    """Markdown lines of the speed table."""
    cpu_columns = [n for n in SPEED_VARIANTS if not n.endswith("2 threads")]
    lines = [
        "",
        "### Speed of the per-task meta-gradient"
        + (" (transcribed from an earlier version of this page, not re-measured)" if speed.get("provenance") else ""),
        "",
        "One meta-batch's per-task meta-gradients (the `task_updates` of every training iteration), measured on "
        f"{speed['machine']}; "
        f"median of {speed['rows'][0]['repeats']} interleaved repeats. CPU seconds of the process measure the work "
        "done with one thread "
        "(wall time adds the waiting for the shared cores); two threads are compared in wall time, as their CPU time "
        "sums both. "
        "`vmap + functional_call` is the path before the batched one; speedup = its CPU time / the batched path's. "
        "All variants compute the same gradients: in float64 the batched and vmapped ones agree to rounding (~1e-15, a "
        "unit test); "
        "the last column is their relative difference in float32 (largest over parameters), where rounding is "
        "amplified by second "
        "derivatives through batch statistics."
        + (f" This table is {speed['provenance']}." if speed.get("provenance") else ""),
        "",
        "| meta-batch | "
        + " | ".join(f"{n} (CPU)" for n in cpu_columns)
        + " | speedup | batched (wall) | batched, 2 threads (wall) | float32 gap |",
        "| --- | " + " | ".join("---" for _ in cpu_columns) + " | --- | --- | --- | --- |",
    ]
    for row in speed["rows"]:
        st, v = row["setting"], row["variants"]
        cells = [f"{v[n]['cpu']:.3f} s" for n in cpu_columns]
        speedup = v["vmap + functional_call"]["cpu"] / v["batched"]["cpu"]
        lines.append(
            f"| {st['label']} ({row['tasks']} tasks) | "
            + " | ".join(cells)
            + f" | {speedup:.2f}× | {v['batched']['wall']:.3f} s | "
            f"{v['batched, 2 threads']['wall']:.3f} s | {row['float32_rel_diff']:.0e} |"
        )
    return lines


def _fmt(acc: float, ci: float) -> str:
    return f"{100 * acc:.1f} ± {100 * ci:.1f}"


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and write its section of ``docs/benchmarks.md``."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run outputs: checkpoints, training logs, montages (default runs/bench-glyphs; --quick: "
             "runs/bench-glyphs-quick)",
    )
    parser.add_argument(
        "--results",
        type=Path,
        help=f"where result files are recorded and the report is built from (default {RESULTS.relative_to(ROOT)}, "
             "which is committed; "
        "--quick: --out)",
    )
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the machine is shared: 1 by default)")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="3 rounds per run and 20 episodes: a smoke test of the script (implies --no-write; results in --out)",
    )
    parser.add_argument("--no-write", action="store_true", help="do not touch docs/benchmarks.md")
    parser.add_argument(
        "--only", choices=("5", "20"), help="only the 5-way or the 20-way runs (two processes can share --out)"
    )
    parser.add_argument(
        "--algorithms",
        help="comma-separated algorithms to (re)run, e.g. 'anil' or 'anil-prototypes' (ANIL with its head_init); a "
             "rerun supersedes the earlier result of the same setting in the report",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the section from the result files in --results, run nothing"
    )
    parser.add_argument(
        "--evaluate-at",
        type=int,
        choices=sorted(QUERIES),
        help="train nothing: evaluate the finished runs chosen by --only/--algorithms (way-agnostic heads only) at "
             "this many ways, "
        "from their checkpoints in --out (results in cross-*.json in --results, merged into the report)",
    )
    parser.add_argument(
        "--speed",
        action="store_true",
        help="only time the per-task meta-gradient formulations (speed.json in --results), then report",
    )
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = ROOT / "runs" / ("bench-glyphs-quick" if args.quick else "bench-glyphs")
    # a smoke run never touches the docs or the committed record
    args.no_write = args.no_write or args.quick
    record: Path = args.results or (args.out if args.quick else RESULTS)
    if args.report_only:
        if not any(record.glob("results-*.json")):
            raise SystemExit(f"no result files (results-*.json) in '{record}' to report from")
        markdown = render_markdown(merge_results(record, args.out))
        print(markdown)
        if not args.no_write:
            update_section("glyphs", markdown)
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("matplotlib", "PIL", "fontTools"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    if args.speed:
        record.mkdir(parents=True, exist_ok=True)
        settings = SPEED_SETTINGS[:2] if args.quick else SPEED_SETTINGS
        speed = {
            "machine": machine_line(),
            "written": _now(),
            "rows": [measure_speed(st, repeats=1 if args.quick else 5) for st in settings],
        }
        (record / ("speed-quick.json" if args.quick else "speed.json")).write_text(json.dumps(speed, indent=1) + "\n")
        print("\n".join(render_speed(speed)))
        if not args.no_write and not args.quick:
            update_section("glyphs", render_markdown(merge_results(record, args.out)))
        return 0
    started = time.perf_counter()
    episodes = 20 if args.quick else EPISODES
    base = load_config(CONFIG)
    if args.evaluate_at:
        chosen = set(args.algorithms.split(",")) if args.algorithms else None
        for run in RUNS:
            if (
                (args.only and int(args.only) != run.ways)
                or (chosen is not None and run.variant not in chosen)
                or not run.way_agnostic
            ):
                continue
            evaluate_elsewhere(run, args.out, args.evaluate_at, base, episodes, record)
        print(render_markdown(merge_results(record, args.out)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    record.mkdir(parents=True, exist_ok=True)
    chosen = set(args.algorithms.split(",")) if args.algorithms else None
    # one file per process and start, never overwritten by a later run: the record keeps every result
    part = (
        f"results-{args.only or 'all'}"
        + (f"-{'-'.join(sorted(chosen))}" if chosen else "")
        + f"-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}.json"
    )
    results: dict[str, Any] = {
        "machine": machine_line(),
        "dates": [_now()[:10]],
        "episodes": episodes,
        "runs": [],
        "floor": {},
    }

    def save() -> None:
        results["written"] = _now()
        (record / part).write_text(json.dumps(results, indent=1) + "\n")

    if args.only in (None, "5") and chosen is None:
        if not args.quick and not args.no_write:
            plot_samples(base, SAMPLES)
        results["render"] = render_throughput(base)
        log.info("render: %s", json.dumps(results["render"]))

    for ways in (5, 20):
        if args.only and int(args.only) != ways:
            continue
        runs = [
            (_quick(r) if args.quick else r) for r in RUNS if r.ways == ways and (chosen is None or r.variant in chosen)
        ]
        tasks = {}
        for shots in EVAL_SHOTS[ways]:
            fam = _eval_family(base, ways, shots)
            tasks[shots] = fam.sample(make_generator(base.seed, "bench-glyphs", ways, shots), episodes, "eval")
            acc = nearest_neighbour_accuracy(tasks[shots])
            results["floor"][f"{ways}-{shots}"] = mean_ci95(acc)
            log.info("pixel 1-NN %d-way %d-shot: %s", ways, shots, _fmt(*mean_ci95(acc)))
        for run in runs:
            out = args.out / run_folder(run, chosen=chosen is not None)
            exp, meta, info = _train(run, out, args.quick)
            row: dict[str, Any] = {
                "run": run.__dict__,
                "out": out.name,
                **{k: v for k, v in info.items() if k != "summary_final"},
                "accuracy": {},
            }
            for shots, batch in tasks.items():
                t0 = time.perf_counter()
                counts = tuple(sorted({run.eval_steps, *run.extra_eval_steps}))
                pre, posts = _accuracies_at(run, meta, ways, batch, counts)
                post = posts[run.eval_steps]
                row["accuracy"][str(shots)] = {
                    "pre": mean_ci95(pre),
                    "post": mean_ci95(post),
                    "post_by_steps": {str(k): mean_ci95(v) for k, v in posts.items()},
                    "eval_seconds": time.perf_counter() - t0,
                }
                log.info(
                    "%s %d-way %d-shot: %s (before adaptation %s; by steps %s)",
                    run.label,
                    ways,
                    shots,
                    _fmt(*mean_ci95(post)),
                    _fmt(*mean_ci95(pre)),
                    {k: _fmt(*mean_ci95(v)) for k, v in posts.items()},
                )
            for other in run.also_eval_ways:
                for shots in EVAL_SHOTS[other]:
                    t0 = time.perf_counter()
                    batch = _eval_family(base, other, shots).sample(
                        make_generator(base.seed, "bench-glyphs", other, shots), episodes, "eval"
                    )
                    pre, post = cross_way_accuracy(run, meta, other, batch)
                    row.setdefault("cross", {})[f"{other}-{shots}"] = {
                        "pre": mean_ci95(pre),
                        "post": mean_ci95(post),
                        "eval_seconds": time.perf_counter() - t0,
                    }
                    log.info(
                        "%s (trained %d-way) at %d-way %d-shot: %s",
                        run.label,
                        run.train_ways or ways,
                        other,
                        shots,
                        _fmt(*mean_ci95(post)),
                    )
            if ways == 5 and run.algorithm == "maml" and not args.quick and not args.no_write:
                episode_figure(exp, meta, tasks[1], run)
            # what the report needs of the run folder, which is not kept: the training curve's shape
            row["trajectory"] = training_trajectory(out)
            row["finished"] = _now()
            results["runs"].append(row)
            save()
    results["total_seconds"] = time.perf_counter() - started
    save()
    markdown = render_markdown(merge_results(record, args.out))
    print(markdown)
    if not args.no_write:
        update_section("glyphs", markdown)
    return 0


def merge_results(folder: Path, runs: Path | None = None) -> dict[str, Any]:
    """Combine the result files in ``folder`` (the record, or a --quick run's --out).

    Files are read oldest first (by the time they say they were written; files from before that
    stamp existed by their modification time); a later run of the same (ways, algorithm)
    supersedes an earlier one, which is kept under ``superseded`` so that the report can say what
    was replaced. A row without a stored training trajectory gets one from its run folder under
    ``runs`` if that still exists.
    """
    merged: dict[str, Any] = {
        "runs": [],
        "floor": {},
        "total_seconds": 0.0,
        "eval_seconds": 0.0,
        "superseded": [],
        "machines": [],
        "dates": [],
        "provenance": [],
    }
    parts = sorted(
        ((path, json.loads(path.read_text())) for path in folder.glob("results-*.json")),
        key=lambda pp: (_written(*pp), pp[0].name),
    )
    rows: list[tuple[str, str, str, int, dict[str, Any]]] = []
    for path, part in parts:
        for key in ("episodes", "render"):
            if key in part:
                merged.setdefault(key, part[key])
        machine = _machine(part.get("machine", ""))
        if machine and machine not in merged["machines"]:
            merged["machines"].append(machine)
        merged["dates"] += part.get("dates") or [_written(path, part)[:10]]
        if part.get("provenance") and part["runs"]:
            merged["provenance"].append(
                {
                    "file": path.name,
                    "text": part["provenance"],
                    "runs": len(part["runs"]),
                    "dates": part.get("dates", []),
                }
            )
        # a file with a provenance was transcribed from an earlier text, not written by its runs
        transcribed = path.name if part.get("provenance") else None
        if "render" in part and "render_transcribed" not in merged:
            merged["render_transcribed"] = transcribed
        for i, row in enumerate(part["runs"]):
            row.setdefault("finished", _written(path, part))
            if transcribed:
                row["transcribed"] = transcribed
            rows.append((row["finished"], _written(path, part), path.name, i, row))
        merged["floor"].update(part["floor"])
        merged.setdefault("floor_transcribed", {}).update(dict.fromkeys(part["floor"], transcribed))
        merged["total_seconds"] += part.get("total_seconds", 0.0)
        merged["eval_seconds"] += part.get("eval_seconds", 0.0)
        # a file that gathers several processes' runs (the reconstructed one) says its longest
        merged["longest_seconds"] = max(
            merged.get("longest_seconds", 0.0), part.get("longest_seconds", part.get("total_seconds", 0.0))
        )
    # a process's file is rewritten after each of its runs: rows supersede in the order they finished
    for *_, row in sorted(rows, key=lambda r: r[:4]):
        same = [r for r in merged["runs"] if (r["run"]["ways"], _variant(r)) == (row["run"]["ways"], _variant(row))]
        for old in same:
            merged["runs"].remove(old)
            merged["superseded"].append(old)
        merged["runs"].append(row)
    crosses = [(path, json.loads(path.read_text())) for path in folder.glob("cross-*.json")]
    for path, part in sorted(crosses, key=lambda pp: (_written(*pp), pp[0].name)):
        for row in merged["runs"]:
            # a retrained run keeps its folder: an evaluation of another checkpoint (or, before
            # checkpoints were fingerprinted, one older than the row) describes another model
            if row.get("out") != part["out"]:
                continue
            if row.get("checkpoint_sha256") and part.get("checkpoint_sha256"):
                current = row["checkpoint_sha256"] == part["checkpoint_sha256"]
            else:
                current = _written(path, part) >= row["finished"]
            if current:
                row.setdefault("cross", {}).update(part["cross"])
    if (folder / "speed.json").exists():
        merged["speed"] = json.loads((folder / "speed.json").read_text())
    merged["transcribed"] = sorted(
        {row["transcribed"] for row in merged["runs"] + merged["superseded"] if row.get("transcribed")}
    )
    for row in merged["runs"] + merged["superseded"]:
        if "trajectory" not in row:
            run = row["run"]
            row["trajectory"] = (
                training_trajectory(runs / row.get("out", f"{run['ways']}way-{run['algorithm']}")) if runs else {}
            )
    merged["dates"] = sorted(set(merged["dates"]))
    order = list(dict.fromkeys(COLUMNS.values()))
    merged["runs"].sort(key=lambda r: (r["run"]["ways"], order.index(_column(r)), bool(r["run"].get("tag"))))
    return merged


def _now() -> str:
    """The current UTC time, ISO 8601 to the second (result files are ordered by it)."""
    return datetime.now(UTC).isoformat(timespec="seconds")


def _written(path: Path, part: dict[str, Any]) -> str:
    """When a result file was written: its own stamp, else (older files) its modification time."""
    stamp = part.get("written")
    if stamp:
        return str(stamp)
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


def _machine(line: str) -> str:
    """A :func:`machine_line` without its date and load (what stays the same across runs)."""
    return re.split(r", \d{4}-\d{2}-\d{2}", line)[0]


def _variant(run: dict[str, Any]) -> str:
    """:attr:`Run.variant` of a run's fields, or of a result row's ``run`` (older rows lack the later fields)."""
    run = run.get("run", run)
    head = run.get("head_init", "learned")
    name = run["algorithm"] if head == "learned" else f"{run['algorithm']}-{head}"
    return (
        name
        + (f"-{run['tag']}" if run.get("tag") else "")
        + (f"-train{run['train_ways']}" if run.get("train_ways") else "")
    )


def _trained_ways(row: dict[str, Any]) -> int:
    """The number of ways a result row's model was meta-trained on."""
    return int(row["run"].get("train_ways") or row["run"]["ways"])


#: table columns in order, by (algorithm, head initialization); tags and training ways share a column
COLUMNS = {
    ("maml", "learned"): "MAML",
    ("fomaml", "learned"): "MAML",
    ("metasgd", "learned"): "Meta-SGD",
    ("anil", "learned"): "ANIL",
    ("anil", "zero"): "ANIL, zero head",
    ("anil", "prototypes"): "ANIL, prototype head",
    ("protonet", "learned"): "ProtoNets",
}


def _column(row: dict[str, Any]) -> str:
    """The table column of a result row."""
    run = row["run"]
    return COLUMNS[(run["algorithm"], run.get("head_init", "learned"))]


def training_trajectory(folder: Path) -> dict[str, float]:
    """Peak and final training query accuracy (after adaptation) of a run, each a mean over 5% of its rounds.

    Reads the run's ``metrics.jsonl`` and, in a run folder of the retired two-phase script, its
    second phase's (``decay/metrics.jsonl``) after it. Empty when the run folder is gone.
    """
    acc = []
    for path in (folder / "metrics.jsonl", folder / "decay" / "metrics.jsonl"):
        if path.exists():
            acc += [
                r["train"]["query_accuracy_post"]
                for r in read_metrics(path)
                if r.get("train") and "query_accuracy_post" in r["train"]
            ]
    if not acc:
        return {}
    k = max(1, len(acc) // 20)
    means = [sum(acc[i : i + k]) / len(acc[i : i + k]) for i in range(0, len(acc) - k + 1, k)]
    return {"peak": max(means), "final": means[-1]}


def render_markdown(results: dict[str, Any]) -> str:
    """The benchmark's section of docs/benchmarks.md from a results dict."""
    n = results["episodes"]
    settings = [(5, 1), (5, 5), (20, 1)]
    present = {_column(row) for row in results["runs"]}
    crossed: list[str] = []

    def results_at(ways: int, shots: int) -> list[tuple[float, float, dict[str, Any], bool]]:
        """(accuracy, interval, row, whether the model was trained at another number of ways)."""
        found = []
        for row in results["runs"]:
            if row["run"]["ways"] == ways and str(shots) in row["accuracy"]:
                found.append((*row["accuracy"][str(shots)]["post"], row, _trained_ways(row) != ways))
            if f"{ways}-{shots}" in row.get("cross", {}):
                found.append((*row["cross"][f"{ways}-{shots}"]["post"], row, True))
        return found

    def cell(ways: int, shots: int, algo: str) -> str:
        mine = [f for f in results_at(ways, shots) if _column(f[2]) == algo]
        if not mine:
            return "—"
        acc, ci, row, cross = max(mine, key=lambda f: f[0])
        mark = _mark(row)
        if not cross:
            return _fmt(acc, ci) + mark
        note = f"{row['run']['label']} trained at {_trained_ways(row)}-way"
        if note not in crossed:
            crossed.append(note)
        return _fmt(acc, ci) + FOOTNOTES[crossed.index(note)] + mark

    columns = [name for name in dict.fromkeys(COLUMNS.values()) if name in present]

    r = results.get("render") or {}
    lines = [
        "## Glyphs: few-shot classification on held-out alphabets",
        "",
        f"Written by `simulations/bench_glyphs.py` from the result files in `{RESULTS.relative_to(ROOT)}/`, runs of "
        f"{_date_span(results.get('dates') or [])} on {'; '.join(results.get('machines') or []) or 'this machine'}; "
        "the longest of its processes ran "
        f"{results.get('longest_seconds', results.get('total_seconds', 0)) / 60:.0f} min of wall time "
        f"({results.get('total_seconds', 0) / 60:.0f} min summed over the processes that ran side by side; the 2 cores "
        "were "
        "shared with other jobs, so wall times are upper bounds). Centralized, IID over the "
        f"background alphabets; accuracy (%) on the same {n} episodes per setting drawn from the evaluation "
        "alphabets only (15 queries per class at 5-way, 5 at 20-way), mean ± 95% interval over episodes."
        + (
            f" Regenerate with `python -m simulations.bench_glyphs --report-only` (renders the record; the runs "
            f"themselves take hours). Numbers marked {TRANSCRIBED} and rows marked (reconstructed) are transcribed "
            f"from earlier versions of this page ({', '.join(f'`{f}`' for f in results['transcribed'])}, see below), "
            "not written by the runs themselves."
            if results.get("transcribed")
            else " Regenerate with `python -m simulations.bench_glyphs --report-only` (renders the record)."
        ),
        "",
        "| setting | raw-pixel 1-NN | " + " | ".join(columns) + " | MAML on Omniglot (published) |",
        "| --- | --- | " + " | ".join("---" for _ in columns) + " | --- |",
    ]
    for ways, shots in settings:
        floor = results["floor"].get(f"{ways}-{shots}")
        if floor is None:
            continue
        cells = [cell(ways, shots, name) for name in columns]
        floor_mark = TRANSCRIBED if (results.get("floor_transcribed") or {}).get(f"{ways}-{shots}") else ""
        lines.append(
            f"| {ways}-way {shots}-shot | {_fmt(*floor)}{floor_mark} | "
            + " | ".join(cells)
            + f" | {OMNIGLOT_MAML[(ways, shots)]} |"
        )
    for i, note in enumerate(crossed):
        lines += [
            "",
            f"{FOOTNOTES[i]} The model of {note} (its head is rebuilt for each support set, so it serves any number of "
            "ways); "
            "where it is better than the model trained at the table's number of ways, the table shows it, a choice "
            "made on these "
            "same test episodes (which flatters the cell a little); the next paragraph lists both.",
        ]
    # every setting where some model was trained at another number of ways: all models of that
    # column side by side, so the reader sees what the training ways did
    others = []
    for ways, shots in settings:
        found = results_at(ways, shots)
        for name in columns:
            mine = sorted((f for f in found if _column(f[2]) == name), key=lambda f: _trained_ways(f[2]))
            if any(cross for *_, cross in mine):
                gave = ", ".join(
                    f"{_fmt(a, c)}{_mark(r)} trained {_trained_ways(r)}-way"
                    + (" from scratch" if r["run"].get("tag") == "scratch" else "")
                    for a, c, r, _ in mine
                )
                others.append(f"{name} at {ways}-way {shots}-shot: {gave}")
    if others:
        lines += ["", "Models across numbers of ways, same episodes: " + "; ".join(others) + "."]
    lines += [
        "",
        "How each model was meta-trained (5-way models on 1-shot episodes, evaluated at 1 and 5 shots; "
        "Conv-4 with 64 channels, per-task batch statistics, stride-2 convolutions; Adam):",
        "",
        "| run | ways | inner loop (train) | steps at test | meta-batch | iterations | outer lr | meta-gradients | "
        "training time (wall) | CPU time of the run | wall s / iteration |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in results["runs"]:
        run = row["run"]
        order = "2nd order" if run["algorithm"] in ("maml", "metasgd", "anil") else "1st order"
        what = {
            "anil": "head only",
            "metasgd": "learned per-parameter rates",
            "maml": "all parameters",
            "fomaml": "all parameters",
        }.get(run["algorithm"], "")
        if run.get("head_init", "learned") != "learned":
            what += f", from a {'zero' if run['head_init'] == 'zero' else 'prototype'} head"
        inner = f"{run['inner_steps']} × {run['inner_lr']:g} ({what}, {order})"
        if run["algorithm"] == "protonet":
            inner = "none (class prototypes of the support set; query cross-entropy of the negative squared distances)"
        iterations = _iterations(row)
        if run.get("start_from"):
            iterations = f"{run['start_iterations']} (from `{run['start_from'].split('/')[0]}`) + {iterations}"
        lines.append(
            f"| {run['label']}{' (reconstructed)' if row.get('transcribed') else ''} | {_trained_ways(row)} | "
            f"{inner} | "
            f"{run['eval_steps'] if run['algorithm'] != 'protonet' else '—'} | "
            f"{run['meta_batch']} × {_trained_ways(row)}-way 1-shot, {run['query']} query/class | {iterations} | "
            f"{run['outer_lr']:g} | "
            f"{_path_label(row)} | {row['train_seconds'] / 60:.1f} min | {row.get('cpu_seconds', 0) / 60:.1f} min | "
            f"{row['train_seconds'] / max(row['rounds'], 1):.2f} |"
        )
    for row in results.get("superseded", []):
        run = row["run"]
        acc = "; ".join(f"{k}-shot {_fmt(*v['post'])}" for k, v in row["accuracy"].items())
        lines.append(
            f"| ~~{run['label']}~~{' (reconstructed)' if row.get('transcribed') else ''} (superseded: {acc}) | "
            f"{run['ways']} | {run['inner_steps']} × {run['inner_lr']:g} | "
            f"{run['eval_steps']} | "
            f"{run['meta_batch']} × {run['ways']}-way 1-shot | {row['rounds']} | {run['outer_lr']:g} | "
            f"{_path_label(row)} | {row['train_seconds'] / 60:.1f} min | "
            f"{row.get('cpu_seconds', 0) / 60:.1f} min | {row['train_seconds'] / max(row['rounds'], 1):.2f} |"
        )
    if any(row["run"].get("decay_rounds") for row in results["runs"]):
        lines += [
            "",
            "Iterations written \"A + B at lr × g\" are runs of the retired two-phase script "
            f"(`simulations/bench_glyphs.py` at commit {TWO_PHASE_COMMIT}), kept as they were recorded: after A "
            "iterations it started a second run "
            "from the first's final meta-parameters at the outer lr × g, with a fresh Adam (moments reset) and fresh "
            "tasks (seed + 1). The script now trains one run with `meta.outer_schedule: step` (milestone A, "
            "`meta.outer_gamma` g), whose Adam moments carry across the milestone; its rows read \"N (lr × g after "
            "A)\", and a rerun is not expected to repeat a two-phase row's numbers exactly.",
        ]
    if any(row["run"].get("start_from") for row in results["runs"]):
        lines += [
            "",
            "Rows whose iterations start with \"(from ...)\" continued from that run's final meta-parameters; their "
            "times are "
            "of their own phases only (add the start run's row for the total). The prototype-head runs keep ANIL's "
            "inner loop, "
            "but their head starts at the support prototypes (`meta.head_init: prototypes`, docs/glyphs.md).",
        ]
    notes = []
    for row in results["runs"] + results.get("superseded", []):
        run, traj = row["run"], row.get("trajectory") or {}
        if traj and traj["final"] < traj["peak"] - 0.15:
            acc = "; ".join(f"{k}-shot {_fmt(*v['post'])}" for k, v in row["accuracy"].items())
            state = "superseded by the rerun above" if row in results.get("superseded", []) else "kept"
            notes.append(
                f"{run['label']} {run['ways']}-way with outer lr {run['outer_lr']:g} diverged: its training query "
                "accuracy "
                f"peaked at {100 * traj['peak']:.0f}% and ended at {100 * traj['final']:.0f}% (held-out {acc}; "
                f"{state})."
            )
    if notes:
        lines += ["", "Training instabilities: " + " ".join(notes)]
    steps_notes = []
    for row in results["runs"]:
        by = (row["accuracy"].get("1") or {}).get("post_by_steps") or {}
        others = [k for k in by if int(k) != row["run"]["eval_steps"]]
        if others:
            run = row["run"]
            steps_notes.append(
                f"{run['label']} {run['ways']}-way 1-shot (trained {_trained_ways(row)}-way) after "
                + ", ".join(f"{k} steps {_fmt(*by[k])}{_mark(row)}" for k in others)
                + f" (table: {run['eval_steps']} steps)"
            )
    if steps_notes:
        lines += ["", "Fewer test-time steps, same episodes: " + "; ".join(steps_notes) + "."]
    lines += [
        "",
        "Meta-gradients: `vmap` — per-task meta-gradients from `torch.func.vmap` over nested `torch.func.grad`; "
        "`batched` — one "
        "grouped-convolution pass for all tasks differentiated by eager autograd (docs/glyphs.md, \"Speed\"; the same "
        "gradients). "
        "Rows measured with different paths, or at different machine loads, are not comparable in time.",
    ]
    cpu = sum(row.get("cpu_seconds", 0.0) for row in results["runs"] + results.get("superseded", []))
    evals = results.get("eval_seconds", 0.0) + sum(
        v.get("eval_seconds", 0.0)
        for row in results["runs"] + results.get("superseded", [])
        for v in [*row["accuracy"].values(), *row.get("cross", {}).values()]
    )
    lines += [
        "",
        f"CPU time of all meta-training runs above: {cpu / 60:.0f} min; the {n}-episode evaluations took "
        f"{evals / 60:.0f} min of wall time more.",
    ]
    for p in results.get("provenance") or []:
        lines += ["", f"The {p['runs']} runs of {_date_span(p['dates'])} (`{p['file']}`) are {p['text']}."]
    if r:
        lines += [
            "",
            ("Rendering (transcribed, from " + f"`{results['render_transcribed']}`): "
             if results.get("render_transcribed") else "Rendering: ")
            + f"the whole drawing bank ({r['images']:,} images of 28×28, {load_catalog_size()} characters × "
            "20 drawings) "
            f"renders from the fonts in {r['cold_cpu_seconds']:.1f} s of CPU time on one thread "
            f"({r['cold_images_per_cpu_second']:,.0f} images per CPU-second; {r['cold_seconds']:.0f} s of wall time on "
            "the shared machine) "
            f"and loads from the cache in {r['warm_seconds']:.2f} s; episodes are assembled from the bank at "
            f"{r['episode_images_per_cpu_second']:,.0f} images per CPU-second.",
        ]
    def best(ways: int, *, own_ways: bool = False) -> tuple[float, str]:
        found = [
            (a, r["run"]["label"] + (f", trained {_trained_ways(r)}-way" if cross else "") + _mark(r))
            for a, _, r, cross in results_at(ways, 1)
            if not (own_ways and cross)
        ]
        return max(found) if found else (math.nan, "—")

    if results.get("speed"):
        lines += render_speed(results["speed"])
    (b5, l5), (b20, l20) = best(5), best(20)
    (o5, m5), (o20, m20) = best(5, own_ways=True), best(20, own_ways=True)
    aims = "met" if b5 >= 0.97 and b20 >= 0.90 else "not reached within this compute budget"
    own = (
        "; with only the models trained at each setting's own number of ways (no choice among training ways on the "
        "test episodes): "
        f"{100 * o5:.1f}% ({m5}) and {100 * o20:.1f}% ({m20}) — {'met' if o5 >= 0.97 and o20 >= 0.90 else 'not met'}"
        if (o5, o20) != (b5, b20)
        else ""
    )
    lines += [
        "",
        f"Against the aims: best 5-way 1-shot {100 * b5:.1f}% ({l5}; aim ≥ 97%), best 20-way 1-shot {100 * b20:.1f}% "
        f"({l20}; aim ≥ 90%) — {aims}{own}.",
    ]
    total_iterations = [row["rounds"] + row["run"].get("start_iterations", 0) for row in results["runs"]]
    lines += [
        "",
        "Reading the table: the floor is what raw pixels give; MAML's Omniglot numbers come from 60,000 "
        f"meta-iterations of meta-batch 32 (5-way) on a GPU, these models from {min(total_iterations, default=0):,} to "
        f"{max(total_iterations, default=0):,} iterations (counting the runs they continued) on two shared CPU cores, "
        "so the gap "
        "to them is mostly training budget. The benchmark and its construction are described in docs/glyphs.md.",
    ]
    return "\n".join(lines)


def _mark(row: dict[str, Any]) -> str:
    """:data:`TRANSCRIBED` for a row of a transcribed result file, else nothing."""
    return TRANSCRIBED if row.get("transcribed") else ""


def _iterations(row: dict[str, Any]) -> str:
    """A result row's iterations: ``N (lr × g after A)`` for a step schedule, ``A + B at lr × g`` for a
    row of the retired two-phase script (:data:`TWO_PHASE_COMMIT`)."""
    run = row["run"]
    decay = run.get("decay_rounds", 0)
    if decay:
        return f"{row['rounds'] - decay} + {decay} at lr × {run.get('decay_factor', 0.1):g}"
    milestones = run.get("milestones") or ()
    if milestones:
        return f"{row['rounds']} (lr × {run.get('gamma', 0.1):g} after {', '.join(map(str, milestones))})"
    return f"{row['rounds']}"


def _date_span(dates: list[str]) -> str:
    """``2026-11-21 to 2026-12-01`` (or the one date)."""
    if not dates:
        return "unrecorded dates"
    first, last = min(dates), max(dates)
    return first if first == last else f"{first} to {last}"


def _path_label(row: dict[str, Any]) -> str:
    """How a run computed its meta-gradients (rows written before the batched path have no record: vmap)."""
    path = row.get("path", "vmap")
    threads = row.get("threads")
    return f"{path}, {threads} thread{'s' if threads and threads > 1 else ''}" if threads else path


def load_catalog_size() -> str:
    """Number of characters in the stored list, formatted."""
    return f"{len(load_catalog()):,}"


if __name__ == "__main__":
    sys.exit(main())
