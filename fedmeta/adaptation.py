"""A new site adapts the published meta-initialization to its own tasks, offline.

This is the third use of fedmeta (SPEC §2.3): a site that took no part in meta-training loads a
checkpoint, checks that it fits its data, adapts to each of its tasks with the checkpoint's own
inner-loop rules (MAML-family: all parameters at ``meta.inner_lr``; Meta-SGD: the learned
per-parameter rates, Li et al. 2017; ANIL: the head only, Raghu et al. 2020), measures query
metrics before and after adaptation, and saves one personalized model per task.

How a site with few tasks gets a 95% interval per task
------------------------------------------------------
One support/query split per task gives one number and no interval. Each task is therefore
evaluated on ``episodes`` independent support/query draws from its own examples (seeded by
``(seed, task name)``); the per-task mean and its 95% interval are over those episodes, so the
interval measures how much the result depends on *which* few examples form the support set.
The site-level figure is the mean of the per-task means, with the stratified interval
``1.96 * sqrt(sum_t s_t^2 / E_t) / T`` (``s_t`` the episode standard deviation of task ``t``):
the site's tasks are fixed, only the support/query draws are random. Every initialization
(the meta-initialization, a random one, a FedAvg-trained one) is adapted on the *same* episodes,
so the comparison is paired.

Everything here runs on the site's machine; nothing is sent anywhere. Checkpoints are read with
``torch.load(weights_only=True)`` (:func:`fedmeta.checkpoint.load_checkpoint`), so a crafted file
cannot run code, and personalized models are written as tensor-only files plus a JSON manifest.
"""

from __future__ import annotations

import json
import logging
import math
import pickle
import re
import struct
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from fedmeta.algorithms import ALGORITHMS, MetaAlgorithm, build_algorithm
from fedmeta.checkpoint import atomic_write_bytes, check_compatible, file_sha256, load_checkpoint
from fedmeta.config import Config, config_from_dict, to_dict
from fedmeta.errors import CheckpointError, ConfigError, DataFormatError
from fedmeta.evaluation import EvalResult, evaluate
from fedmeta.models import FunctionalModel, build_model
from fedmeta.rng import make_generator
from fedmeta.tasks.base import SPLITS
from fedmeta.tasks.folder import FolderFamily, SiteTask, TooFewClassesError, load_image
from fedmeta.types import LR_PREFIX, Params, TaskBatch, model_part

__all__ = [
    "Initialization",
    "SiteData",
    "open_site",
    "load_initialization",
    "random_initialization",
    "draw_episodes",
    "evaluate_initialization",
    "stratified_mean_ci95",
    "personalize",
    "save_personalized",
    "load_personalized",
    "PersonalizedModels",
    "adapt_site",
    "serves_any_ways",
    "format_summary",
    "plot_adaptation",
    "REPORT_NAME",
    "CURVE_NAME",
    "MODELS_DIR",
    "DEPLOYMENT_DOC",
]

log = logging.getLogger(__name__)

REPORT_NAME = "adapt_report.json"
CURVE_NAME = "adaptation_curve.png"
MODELS_DIR = "models"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "fedmeta-personalized"
#: 2: tasks may have their own number of outputs (``tasks.NAME.outputs``, way-agnostic heads);
#: version 1 manifests (one ``model.outputs`` for every task) are read too
MANIFEST_VERSION = 2
_MANIFEST_VERSIONS = (1, 2)
#: where a site reads how to join later federated rounds as a SuperNode
DEPLOYMENT_DOC = "docs/deployment.md"
_Z95 = 1.96


# ---------------------------------------------------------------------------------------------
# The site's data


@dataclass(frozen=True)
class SiteData:
    """One site folder opened for adaptation.

    Attributes:
        path: the site folder.
        family: the folder task family (draws support/query episodes from the stored tasks).
        split: ``"train"`` for the site's ``tasks/`` folder, ``"eval"`` for ``heldout/``.
        tasks: the stored tasks of that folder, sorted by name.
    """

    path: Path
    family: FolderFamily
    split: str
    tasks: list[SiteTask]

    @property
    def kind(self) -> str:
        """``"regression"`` or ``"classification"``."""
        return self.family.kind


def open_site(data: str | Path, *, shots: int, query: int, ways: int, split: str = "tasks") -> SiteData:
    """Open a site folder in the documented format (``docs/data-format.md``).

    Args:
        data: the site folder (``SITE/tasks/...``).
        shots: support examples per task (per class for classification).
        query: query examples per task (per class for classification).
        ways: classes per episode (classification: the checkpoint's ``task.ways``, or any number
            for a way-agnostic checkpoint, :func:`serves_any_ways`).
        split: ``"tasks"`` or ``"heldout"``: which folder of the site to adapt to.

    Raises:
        DataFormatError: naming the folder or file that does not match the format, or the task
            that has too few examples for ``shots`` + ``query``.
    """
    root = Path(data)
    folders = {"tasks": "train", "heldout": "eval"}
    if split not in folders:
        raise ConfigError(f"--split must be 'tasks' or 'heldout', got {split!r}")
    if shots < 1 or query < 1:
        raise ConfigError(f"--shots and --query must be at least 1, got shots={shots}, query={query}")
    if not root.is_dir():
        raise DataFormatError(f"data folder '{root}' does not exist or is not a folder (see docs/data-format.md)")
    if not (root / "tasks").is_dir():
        sites = sorted(p for p in root.iterdir() if p.is_dir() and (p / "tasks").is_dir())
        if sites:
            raise DataFormatError(
                f"data folder '{root}' is a folder of {len(sites)} sites; a new site adapts on its own "
                f"folder: point --data at one of them, e.g. '{sites[0]}'"
            )
    family = FolderFamily(root, shots=shots, query=query, ways=ways)
    tasks = family.tasks(folders[split])
    return SiteData(root, family, folders[split], tasks)


# ---------------------------------------------------------------------------------------------
# Initializations


@dataclass(frozen=True)
class Initialization:
    """Parameters to adapt from, with the algorithm whose inner loop adapts them.

    Attributes:
        label: ``"meta"``, ``"random"`` or ``"compare"``.
        params: model parameters (plus Meta-SGD rates under ``lr.``).
        algorithm: decides what adapts and with which step sizes.
        config: the config the checkpoint was trained with.
        source: where the parameters came from (a file, or how they were drawn).
        info: checkpoint facts for the report (round, algorithm, task, sha256).
    """

    label: str
    params: Params
    algorithm: MetaAlgorithm
    config: Config
    source: str
    info: dict[str, Any]

    @property
    def model(self) -> FunctionalModel:
        """The functional model the parameters belong to."""
        return self.algorithm.model


def _read_checkpoint(path: Path) -> dict[str, Any]:
    """:func:`load_checkpoint`, with every failure of a corrupt file reported as a CheckpointError.

    ``torch.load(weights_only=True)`` on arbitrary bytes can also fail with ``KeyError`` or
    ``IndexError`` from its restricted unpickler; those mean "corrupt" too, not a crash.
    """
    try:
        return load_checkpoint(path)
    except CheckpointError:
        raise
    except (KeyError, IndexError, TypeError, struct.error, MemoryError, OverflowError) as exc:
        raise CheckpointError(
            f"checkpoint '{path}' is corrupt or not a safe tensor-only file: {type(exc).__name__}: {exc}"
        ) from exc


def _checkpoint_config(state: dict[str, Any], path: Path) -> Config:
    raw = state.get("config")
    if not isinstance(raw, dict):
        raise CheckpointError(f"checkpoint '{path}' carries no training config; it cannot be adapted from")
    try:
        return config_from_dict(raw, source=f"checkpoint '{path}'")
    except ConfigError as exc:
        raise CheckpointError(f"checkpoint '{path}' carries a config this fedmeta cannot read: {exc}") from exc


def load_initialization(
    path: str | Path, site: SiteData, *, label: str = "meta", state: dict[str, Any] | None = None
) -> Initialization:
    """Load a published checkpoint and check that it fits the site's data.

    The checkpoint is read with ``torch.load(weights_only=True)``. The model is rebuilt from the
    config stored in the checkpoint, for the site's input shape and outputs; then the task kind,
    the model name, every parameter shape, Meta-SGD's rates (when the algorithm uses them) and a
    forward pass on one of the site's examples are checked before anything adapts.

    Args:
        path: the checkpoint file.
        site: the opened site (:func:`open_site`).
        label: how the report names this initialization.
        state: the already loaded checkpoint (:func:`fedmeta.checkpoint.load_checkpoint` of
            ``path``), to avoid reading it twice.

    Returns:
        The initialization, with the checkpoint's algorithm.

    Raises:
        CheckpointError: naming the file, if it is missing, corrupt, unsafe, or does not fit the
            site's model, task kind or shapes.
    """
    p = Path(path)
    state = _read_checkpoint(p) if state is None else state
    cfg = _checkpoint_config(state, p)
    trained_kind = state.get("task_kind")
    if trained_kind not in (None, site.kind):
        raise CheckpointError(
            f"checkpoint '{p}' was trained on {trained_kind} tasks ({cfg.task.name}), but site '{site.path}' "
            f"holds {site.kind} tasks"
        )
    try:
        model = build_model(cfg, site.family.input_shape, site.family.output_dim)
        algo = build_algorithm(
            cfg.meta.algorithm,
            model,
            kind=site.kind,
            inner_lr=cfg.meta.inner_lr,
            inner_steps=cfg.meta.inner_steps,
            head_init=cfg.meta.head_init,
        )
    except (ConfigError, ValueError, TypeError) as exc:
        raise CheckpointError(f"checkpoint '{p}': its model cannot be built for site '{site.path}': {exc}") from exc
    described = (state.get("model") or {}).get("name")
    if described not in (None, model.name):
        raise CheckpointError(
            f"checkpoint '{p}' describes a '{described}' model but its config builds '{model.name}'; the file is "
            "inconsistent"
        )
    state = _fit_head_to_site(state, model, cfg, p, site)
    check_compatible(state, model.param_shapes, path=p, task_kind=site.kind)
    params = {k: v.detach().clone().float() for k, v in state["meta_params"].items()}
    rates = {k for k in params if k.startswith(LR_PREFIX)}
    if cfg.meta.algorithm == "metasgd":
        want = {f"{LR_PREFIX}{k}" for k in model.param_shapes}
        if rates != want:
            raise CheckpointError(
                f"checkpoint '{p}' is a Meta-SGD checkpoint without a learned rate for every parameter "
                f"(missing {sorted(want - rates)[:3]}, unexpected {sorted(rates - want)[:3]})"
            )
        for k in want:
            if params[k].shape != params[k[len(LR_PREFIX) :]].shape:
                raise CheckpointError(f"checkpoint '{p}': learned rate '{k}' does not have its parameter's shape")
    elif rates:
        log.warning(
            "checkpoint %s holds learned rates but its algorithm is %s; they are ignored", p, cfg.meta.algorithm
        )
        params = model_part(params)
    example = site.tasks[0].x if site.tasks[0].x is not None else site.tasks[0].support[0]  # type: ignore[index]
    try:
        with torch.no_grad():
            out = model.forward(model_part(params), torch.from_numpy(np.asarray(example[:1])))
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"checkpoint '{p}': its {model.name} model does not accept site '{site.path}' inputs of shape "
            f"{site.family.input_shape}: {first}"
        ) from exc
    if tuple(out.shape[1:]) != (site.family.output_dim,):
        raise CheckpointError(
            f"checkpoint '{p}': its model gives {tuple(out.shape[1:])} outputs, site '{site.path}' needs "
            f"{site.family.output_dim}"
        )
    info = {
        "path": str(p),
        "sha256": file_sha256(p),
        "round": state.get("round"),
        "algorithm": cfg.meta.algorithm,
        "task": cfg.task.name,
        "model": model.name,
        "inner_lr": cfg.meta.inner_lr,
        "learned_rates": cfg.meta.algorithm == "metasgd",
        "adapts": type(algo).adapts,
        "head_init": cfg.meta.head_init,
        "trained_ways": cfg.task.ways if site.kind == "classification" else None,
        "serves_any_ways": serves_any_ways(cfg, site.kind),
    }
    return Initialization(label, params, algo, cfg, str(p), info)


def serves_any_ways(cfg: Config, kind: str | None) -> bool:
    """Whether a checkpoint trained with ``cfg`` on ``kind`` tasks classifies any number of classes.

    The algorithm says (:meth:`~fedmeta.algorithms.MetaAlgorithm.serves_any_ways`): ANIL whose head
    is rebuilt for each support set (``meta.head_init`` ``prototypes``: from the support-class
    means; ``zero``: from zeros) and Prototypical Networks never use their stored head, only that
    head's shape; every other classifier's head is tied to the ``task.ways`` it was trained on.
    """
    return kind == "classification" and ALGORITHMS.get(cfg.meta.algorithm).serves_any_ways(head_init=cfg.meta.head_init)


def _fit_head_to_site(
    state: dict[str, Any], model: FunctionalModel, cfg: Config, path: Path, site: SiteData
) -> dict[str, Any]:
    """The checkpoint with a head of the site's number of classes where the head is way-agnostic.

    A way-agnostic head (:func:`serves_any_ways`) is replaced by zeros of the shape the site
    needs (it is rebuilt from each support set anyway); a learned head of another shape is an
    error that says which checkpoints do serve other numbers of ways.
    """
    stored = state.get("meta_params")
    if not isinstance(stored, dict) or site.kind != "classification":
        return state
    shapes = model.param_shapes
    heads = [k for k in model.head_keys() if k in stored and tuple(stored[k].shape) != tuple(shapes[k])]
    if not heads:
        return state
    body_fits = all(tuple(v.shape) == tuple(shapes[k]) for k, v in stored.items() if k in shapes and k not in heads)
    if not body_fits:
        return state  # a different model altogether: check_compatible names the first mismatch
    trained = int(stored[heads[0]].shape[0])
    if not serves_any_ways(cfg, site.kind):
        raise _learned_head_error(path, cfg, trained, f"{site.family.output_dim}-way ones")
    log.info(
        "checkpoint %s: way-agnostic head (meta.head_init %s) trained %d-way, used %d-way",
        path,
        cfg.meta.head_init,
        trained,
        site.family.output_dim,
    )
    return {**state, "meta_params": _head_for(model, stored, site.family.output_dim)}


def _learned_head_error(path: Path, cfg: Config, trained: int, wanted: str) -> CheckpointError:
    """Why a checkpoint with a learned ``trained``-way head cannot adapt to ``wanted`` episodes, and which can."""
    return CheckpointError(
        f"checkpoint '{path}' has a learned {trained}-way head (meta.algorithm {cfg.meta.algorithm!r}, meta.head_init "
        f"{cfg.meta.head_init!r}): it adapts to {trained}-way episodes only, not {wanted}; a checkpoint meta-trained "
        "with "
        "meta.algorithm 'anil' and meta.head_init 'prototypes' (or 'zero'), or with meta.algorithm 'protonet', whose "
        "head is "
        "rebuilt for each support set, "
        "serves any number of ways"
    )


def random_initialization(reference: Initialization, seed: int) -> Initialization:
    """The same model and adaptation rule as ``reference``, from freshly drawn parameters.

    Parameters come from the model's own initializer with a generator derived from
    ``(seed, "adapt", "random-init")``; Meta-SGD rates (if any) start at ``meta.inner_lr``, as
    before meta-training. This is the "what did meta-training buy us" baseline.
    """
    params = reference.algorithm.init_meta_params(make_generator(seed, "adapt", "random-init"))
    # it was never trained: no number of ways it was trained on (it is built for the site's)
    info = {**reference.info, "path": None, "sha256": None, "round": 0, "seed": seed, "trained_ways": None}
    return Initialization("random", params, reference.algorithm, reference.config, f"random (seed {seed})", info)


# ---------------------------------------------------------------------------------------------
# Episodes and evaluation


def draw_episodes(site: SiteData, episodes: int, seed: int) -> dict[str, TaskBatch]:
    """``episodes`` support/query draws for each of the site's tasks.

    Each task's draws come from a generator derived from ``(seed, "adapt-episodes", task name)``,
    so they do not change when other tasks are added or removed.

    Returns:
        ``{task name: TaskBatch of `episodes` episodes}`` in the site's task order.

    Raises:
        DataFormatError: if ``episodes`` is below 1.
    """
    if episodes < 1:
        raise ConfigError(f"--episodes must be at least 1, got {episodes}")
    split_id = float(SPLITS.index(site.split))
    out: dict[str, TaskBatch] = {}
    for idx, task in enumerate(site.tasks):
        params = torch.tensor([[float(idx), split_id]] * episodes)
        out[task.name] = site.family.make_tasks(params, make_generator(seed, "adapt-episodes", task.name))
    return out


def stratified_mean_ci95(per_task: list[Tensor]) -> tuple[float, float]:
    """Mean of the per-task means and its stratified 95% half-width.

    Args:
        per_task: one 1-D tensor of episode values per task.

    Returns:
        ``(mean_t mean(x_t), 1.96 * sqrt(sum_t var(x_t) / n_t) / T)`` with the unbiased episode
        variance (0 for a task with a single episode).
    """
    means, var_of_mean = [], 0.0
    for v in per_task:
        v = v.double().flatten()
        means.append(float(v.mean()))
        if v.numel() > 1:
            var_of_mean += float(v.var(unbiased=True)) / v.numel()
    t = len(means)
    if t == 0:
        return math.nan, math.nan
    return sum(means) / t, _Z95 * math.sqrt(var_of_mean) / t


def _metric_block(curves: dict[str, list[Tensor]]) -> dict[str, Any]:
    """Before/after/curve statistics over tasks (stratified) for every metric in ``curves``."""
    out: dict[str, Any] = {}
    for name, per_task in curves.items():
        steps = per_task[0].shape[1] - 1
        for stage, col in (("pre_adapt", 0), ("post_adapt", steps)):
            mean, half = stratified_mean_ci95([c[:, col] for c in per_task])
            out[f"{stage}_{name}"] = mean
            out[f"{stage}_{name}_ci95"] = half
        curve, curve_ci = [], []
        for s in range(steps + 1):
            m, h = stratified_mean_ci95([c[:, s] for c in per_task])
            curve.append(m)
            curve_ci.append(h)
        out[f"{name}_curve"] = curve
        out[f"{name}_curve_ci95"] = curve_ci
    return out


def evaluate_initialization(
    init: Initialization, episodes: dict[str, TaskBatch], *, steps: int, chunk: int = 200
) -> dict[str, Any]:
    """Adapt ``init`` on every episode's support set and measure the query set after 0..steps steps.

    Args:
        init: what to adapt from.
        episodes: :func:`draw_episodes`' output.
        steps: inner steps.
        chunk: episodes adapted together in one vectorized call (bounds memory).

    Returns:
        A JSON-ready dict: ``aggregate`` (site level, stratified 95% intervals), ``per_task``
        (episode means and 95% intervals), ``seconds`` (wall time of all adaptations) and
        ``adaptations`` (how many episodes were adapted).
    """
    t0 = time.perf_counter()
    # every task's episodes have the same shapes: one vectorized pass over all of them
    names = list(episodes)
    sizes = [episodes[n].num_tasks for n in names]
    whole = evaluate(
        init.algorithm, init.params, TaskBatch.concat([episodes[n] for n in names]), steps=steps, batch=chunk
    )
    seconds = time.perf_counter() - t0
    bounds = np.cumsum([0, *sizes]).tolist()
    results = {
        n: EvalResult(
            whole.loss[bounds[i] : bounds[i + 1]],
            None if whole.accuracy is None else whole.accuracy[bounds[i] : bounds[i + 1]],
        )
        for i, n in enumerate(names)
    }
    per_task: dict[str, Any] = {}
    curves: dict[str, list[Tensor]] = {"loss": []}
    for name, res in results.items():
        entry: dict[str, Any] = {"episodes": int(res.loss.shape[0])}
        metrics = [("loss", res.loss)] + ([("accuracy", res.accuracy)] if res.accuracy is not None else [])
        for metric, curve in metrics:
            curves.setdefault(metric, []).append(curve)
            entry.update(_metric_block({metric: [curve]}))
        per_task[name] = entry
    total = sum(int(r.loss.shape[0]) for r in results.values())
    return {
        "label": init.label,
        "source": init.source,
        "algorithm": init.info.get("algorithm"),
        "aggregate": _metric_block(curves),
        "per_task": per_task,
        "seconds": seconds,
        "adaptations": total,
    }


# ---------------------------------------------------------------------------------------------
# Personalized models


@dataclass(frozen=True)
class PersonalizedTask:
    """One task's adapted parameters and how they were obtained."""

    name: str
    params: Params
    classes: list[Any] | None
    examples: int
    support_loss_pre: float
    support_loss_post: float
    seconds: float


def _fit_set(task: SiteTask, kind: str, ways: int | None) -> tuple[Tensor, Tensor, list[Any] | None] | str:
    """All of a task's support-side examples, relabelled 0..ways-1 for classification, or why not.

    ``ways=None`` (a way-agnostic head) takes every class the task has.
    """
    x, y = (task.x, task.y) if task.x is not None else task.support  # type: ignore[misc]
    assert y is not None  # a task holds x and y together, or a support pair
    if kind != "classification":
        return torch.from_numpy(x), torch.from_numpy(y), None
    labels = np.unique(y)
    if ways is None and len(labels) < 2:
        return f"it has {len(labels)} class; a personalized classifier needs at least 2"
    if ways is not None and len(labels) != ways:
        return (
            f"it has {len(labels)} classes but the model's head has {ways} outputs; a personalized "
            f"classifier needs exactly {ways} (the episodes above still evaluate {ways}-way subsets)"
        )
    remap = {int(c): i for i, c in enumerate(labels)}
    yy = np.asarray([remap[int(c)] for c in y], dtype=np.int64)
    names = [task.classes[int(c)] for c in labels] if task.classes is not None else [int(c) for c in labels]
    return torch.from_numpy(x), torch.from_numpy(yy), names


def _head_for(model: FunctionalModel, params: Params, ways: int) -> Params:
    """``params`` with a zero head of ``ways`` rows (a way-agnostic head only uses its shape)."""
    heads = set(model.head_keys())
    return {k: (v.new_zeros((ways, *v.shape[1:])) if k in heads else v) for k, v in params.items()}


def personalize(
    init: Initialization, site: SiteData, *, steps: int
) -> tuple[dict[str, PersonalizedTask], dict[str, str]]:
    """Adapt ``init`` to each task on all of its support-side examples.

    The evaluation episodes measure what ``shots`` examples buy; the model a site keeps is
    adapted with the same rule and number of steps on every example it may train on (all of
    ``x``/``y``, or the declared support side), which is at least as informative.

    Returns:
        ``(personalized tasks by name, {skipped task: reason})``. A classification task whose
        number of classes differs from the head's outputs is skipped, unless the head is
        way-agnostic (:func:`serves_any_ways`): then each task's model has one output per class
        the task has.
    """
    algo, meta = init.algorithm, {k: v.detach() for k, v in init.params.items()}
    any_ways = serves_any_ways(init.config, site.kind)
    done: dict[str, PersonalizedTask] = {}
    skipped: dict[str, str] = {}
    for task in site.tasks:
        fit = _fit_set(task, site.kind, None if any_ways else site.family.output_dim)
        if isinstance(fit, str):
            skipped[task.name] = fit
            log.warning("task %s: no personalized model saved: %s", task.name, fit)
            continue
        x, y, classes = fit
        start = meta
        if any_ways and classes is not None and len(classes) != site.family.output_dim:
            # the head starts from this task's own support set: give it one row per class it has
            start = _head_for(init.model, meta, len(classes))
        t0 = time.perf_counter()
        # the loss before the first step is where the inner loop starts (ANIL's prototype head, say)
        adapted, start_loss = algo.adapt_with_loss(start, x, y, steps, first_order=True)
        adapted = {k: v.detach().clone() for k, v in adapted.items()}
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            pre, post = float(start_loss), float(algo.loss(adapted, x, y))
        done[task.name] = PersonalizedTask(task.name, adapted, classes, int(x.shape[0]), pre, post, seconds)
    return done, skipped


def _safe_name(name: str, taken: set[str]) -> str:
    base = re.sub(r"[^A-Za-z0-9._-]", "_", name) or "task"
    out, i = base, 1
    while out in taken:
        i += 1
        out = f"{base}-{i}"
    taken.add(out)
    return out


def save_personalized(
    directory: str | Path,
    init: Initialization,
    site: SiteData,
    tasks: dict[str, PersonalizedTask],
    *,
    steps: int,
    skipped: dict[str, str] | None = None,
) -> Path:
    """Write one tensor-only ``.pt`` per task and ``manifest.json`` describing how to rebuild the model.

    Each ``.pt`` is a plain ``{parameter name: tensor}`` dict (readable with
    ``torch.load(weights_only=True)``); the manifest holds the training config, the input shape,
    the outputs, the class names of classification tasks and where the initialization came from.

    Returns:
        The manifest path.
    """
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    entries: dict[str, Any] = {}
    import io

    for name, task in tasks.items():
        fname = _safe_name(name, taken) + ".pt"
        buf = io.BytesIO()
        torch.save({k: v.contiguous() for k, v in task.params.items()}, buf)
        atomic_write_bytes(out / fname, buf.getvalue())
        entries[name] = {
            "file": fname,
            "classes": task.classes,
            "outputs": len(task.classes) if task.classes is not None else site.family.output_dim,
            "examples": task.examples,
            "support_loss_before": task.support_loss_pre,
            "support_loss_after": task.support_loss_post,
            "seconds": task.seconds,
        }
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "kind": site.kind,
        "model": {
            **init.model.describe(),
            "input_shape": list(site.family.input_shape),
            "outputs": site.family.output_dim,
        },
        "config": to_dict(init.config),
        "initialization": {k: init.info.get(k) for k in ("path", "sha256", "round", "algorithm", "task")},
        "steps": steps,
        "site": str(site.path),
        "tasks": entries,
        "skipped": skipped or {},
    }
    path = out / MANIFEST_NAME
    atomic_write_bytes(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return path


class PersonalizedModels:
    """A site's personalized models, loaded for prediction (see :func:`load_personalized`).

    Attributes:
        manifest: the parsed ``manifest.json``.
        kind: ``"regression"`` or ``"classification"``.
        model: the functional model the parameters belong to.
        input_shape: the shape of one input example.
    """

    def __init__(self, manifest: dict[str, Any], model: FunctionalModel, params: dict[str, Params], path: Path) -> None:
        self.manifest = manifest
        self.kind: str = manifest["kind"]
        self.model = model
        self.input_shape = tuple(manifest["model"]["input_shape"])
        self._params = params
        self.path = path

    @property
    def tasks(self) -> list[str]:
        """Names of the tasks that have a personalized model."""
        return list(self._params)

    def params(self, task: str) -> Params:
        """The adapted parameters of ``task``."""
        return self._params[self._task(task)]

    def _task(self, task: str | None) -> str:
        if task is None:
            if len(self._params) == 1:
                return next(iter(self._params))
            some = ", ".join(list(self._params)[:5]) + (", ..." if len(self._params) > 5 else "")
            raise DataFormatError(
                f"models in '{self.path}' cover {len(self._params)} tasks ({some}): name one with --task"
            )
        if task not in self._params:
            some = ", ".join(list(self._params)[:5]) + (", ..." if len(self._params) > 5 else "")
            raise DataFormatError(f"models in '{self.path}' have no task {task!r} (tasks: {some or 'none'})")
        return task

    def _inputs(self, x: np.ndarray | Tensor) -> Tensor:
        t = x.detach().float() if isinstance(x, Tensor) else torch.as_tensor(np.asarray(x, dtype=np.float32))
        if tuple(t.shape) == self.input_shape:
            t = t[None]  # one example
        elif self.input_shape == (1,) and t.dim() == 1:
            t = t[:, None]  # a vector of scalar inputs
        if t.dim() < 1 or tuple(t.shape[1:]) != self.input_shape:
            raise DataFormatError(
                f"inputs of shape {tuple(t.shape)} do not fit these models, which take [N, "
                f"{', '.join(map(str, self.input_shape))}]"
            )
        return t

    def outputs(self, task: str | None, x: np.ndarray | Tensor) -> Tensor:
        """Raw model outputs (regression predictions, or class logits) for inputs ``x`` ``[N, *input_shape]``."""
        name = self._task(task)
        inputs = self._inputs(x)
        model_cfg = self.manifest.get("config", {}).get("model", {})
        classes = int(self.manifest["tasks"][name].get("outputs", self.manifest["model"]["outputs"]))
        if model_cfg.get("name") == "conv4" and model_cfg.get("norm") == "batch" and inputs.shape[0] < classes:
            log.warning(
                "this Conv-4 normalizes with the statistics of the batch it is given (model.norm 'batch'): "
                "predictions for %d input(s) at a time are less reliable; predict a batch like a query set "
                "(a few examples of every class)",
                inputs.shape[0],
            )
        with torch.no_grad():
            return self.model.forward(self._params[name], inputs)

    def predict(self, task: str | None, x: np.ndarray | Tensor) -> np.ndarray:
        """Predictions for inputs ``x``: values ``[N, outputs]`` or class labels ``[N]``.

        Classification labels are the site's own (class folder names, or the integer labels of
        its ``.npz`` files). ``task`` may be ``None`` when only one task was personalized.

        Raises:
            DataFormatError: for an unknown task or inputs of the wrong shape.
        """
        name = self._task(task)
        out = self.outputs(name, x)
        if self.kind != "classification":
            return out.numpy()
        classes = self.manifest["tasks"][name]["classes"]
        return np.asarray([classes[i] for i in out.argmax(dim=-1).tolist()])


def load_personalized(path: str | Path) -> PersonalizedModels:
    """Load personalized models written by ``fedmeta adapt`` (or :func:`save_personalized`).

    Args:
        path: the ``models/`` folder, its ``manifest.json``, or the ``fedmeta adapt`` output folder.

    Example::

        from fedmeta.adaptation import load_personalized
        models = load_personalized("runs/adapt-site-0000")
        y = models.predict("train-0000", x)   # x: [N, *input_shape]

    Raises:
        CheckpointError: naming the file if the manifest or a parameter file is missing, corrupt,
            or does not fit the model the manifest describes.
    """
    p = Path(path)
    if p.is_dir() and not (p / MANIFEST_NAME).exists() and (p / MODELS_DIR / MANIFEST_NAME).exists():
        p = p / MODELS_DIR
    manifest_path = p / MANIFEST_NAME if p.is_dir() else p
    if not manifest_path.is_file():
        raise CheckpointError(
            f"personalized models '{manifest_path}' do not exist (expected the manifest.json written by fedmeta adapt)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"manifest '{manifest_path}' is not readable JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise CheckpointError(f"'{manifest_path}' is not a fedmeta personalized-model manifest")
    if manifest.get("version") not in _MANIFEST_VERSIONS:
        raise CheckpointError(
            f"manifest '{manifest_path}' has version {manifest.get('version')!r}; this fedmeta reads versions "
            f"{', '.join(map(str, _MANIFEST_VERSIONS))}"
        )
    tasks_entries = manifest.get("tasks") or {}
    if not isinstance(tasks_entries, dict) or not all(isinstance(e, dict) for e in tasks_entries.values()):
        raise CheckpointError(
            f"manifest '{manifest_path}': 'tasks' must map each task name to an object with its 'file'"
        )
    try:
        cfg = config_from_dict(manifest["config"], source=str(manifest_path))
        desc = manifest["model"]
        model = build_model(cfg, tuple(desc["input_shape"]), int(desc["outputs"]))
        # a way-agnostic head personalizes each task with its own number of classes
        outputs = {name: int(entry.get("outputs", desc["outputs"])) for name, entry in tasks_entries.items()}
        models = {
            n: build_model(cfg, tuple(desc["input_shape"]), n) for n in set(outputs.values()) - {int(desc["outputs"])}
        }
        models[int(desc["outputs"])] = model
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(
            f"manifest '{manifest_path}' does not describe a model this fedmeta can build: {exc}"
        ) from exc
    params: dict[str, Params] = {}
    for name, entry in tasks_entries.items():
        task_model = models[outputs[name]]
        f = manifest_path.parent / str(entry.get("file", ""))
        if not f.is_file():
            raise CheckpointError(f"personalized model '{f}' of task {name!r} is missing")
        try:
            state = torch.load(f, map_location="cpu", weights_only=True)
        except (
            pickle.UnpicklingError,
            RuntimeError,
            EOFError,
            zipfile.BadZipFile,
            OSError,
            ValueError,
            AttributeError,
            KeyError,
            IndexError,
            TypeError,
            struct.error,
        ) as exc:
            raise CheckpointError(f"personalized model '{f}' is corrupt or not a tensor-only file: {exc}") from exc
        if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
            raise CheckpointError(f"personalized model '{f}' is not a dict of tensors")
        wrong = {k: tuple(v.shape) for k, v in state.items() if task_model.param_shapes.get(k) != tuple(v.shape)}
        if set(state) != set(task_model.param_shapes) or wrong:
            raise CheckpointError(
                f"personalized model '{f}' does not fit the {task_model.name} model its manifest describes"
            )
        params[name] = state
    return PersonalizedModels(manifest, model, params, manifest_path.parent)


def read_inputs(path: str | Path) -> np.ndarray:
    """Read prediction inputs: an ``.npz`` with array ``x``, an ``.npy``, one image, or a folder of images.

    Raises:
        DataFormatError: naming the file if it cannot be read.
    """
    from fedmeta.tasks.folder import IMAGE_SUFFIXES

    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DataFormatError(f"input folder '{p}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
        return np.stack([load_image(f) for f in files])
    if not p.is_file():
        raise DataFormatError(f"input file '{p}' does not exist")
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return load_image(p)[None]
    try:
        if p.suffix == ".npy":
            arr = np.load(p, allow_pickle=False)
        else:
            with np.load(p, allow_pickle=False) as data:
                if "x" not in data.files:
                    raise DataFormatError(f"input file '{p}' has no array 'x' (it has {sorted(data.files)})")
                arr = data["x"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DataFormatError(f"input file '{p}' is not a readable .npz/.npy array file: {exc}") from exc
    if not np.issubdtype(arr.dtype, np.number):
        raise DataFormatError(f"input file '{p}': inputs must be numeric, got dtype {arr.dtype}")
    return arr.astype(np.float32)


# ---------------------------------------------------------------------------------------------
# The whole command


def adapt_site(
    checkpoint: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    steps: int | None = None,
    shots: int | None = None,
    query: int | None = None,
    episodes: int = 20,
    split: str = "tasks",
    seed: int = 0,
    compare: str | Path | None = None,
    save_models: bool = True,
    ways: int | None = None,
) -> dict[str, Any]:
    """Everything ``fedmeta adapt`` does: load, check, adapt, compare, save, report.

    Args:
        checkpoint: the published meta-initialization.
        data: the site folder.
        out: output folder (``adapt_report.json``, ``adaptation_curve.png``, ``models/``).
        steps: inner steps (default: the checkpoint's ``eval.steps``).
        shots: support examples per task / per class (default: the checkpoint's ``task.shots``).
        query: query examples per task / per class (default: the checkpoint's ``task.query``).
        episodes: support/query draws per task (see the module docstring).
        split: ``"tasks"`` or ``"heldout"`` folder of the site.
        seed: seeds the episodes and the random-initialization baseline.
        compare: a second checkpoint (e.g. FedAvg-trained) adapted on the same episodes.
        save_models: write personalized models for the meta-initialization.
        ways: classes per episode (classification; default: the checkpoint's ``task.ways``).
            Another number needs a way-agnostic checkpoint (:func:`serves_any_ways`).

    Returns:
        The report written to ``out/adapt_report.json``.

    Raises:
        CheckpointError: for a missing, corrupt or incompatible checkpoint (either one).
        DataFormatError: for a site folder that does not match the format or has too few examples.
    """
    started = time.perf_counter()
    ckpt = Path(checkpoint)
    state = _read_checkpoint(ckpt)
    state_cfg = _checkpoint_config(state, ckpt)
    t = state_cfg.task
    shots = t.shots if shots is None else shots
    query = t.query if query is None else query
    steps = state_cfg.eval.steps if steps is None else steps
    if steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {steps}")
    trained_kind = state.get("task_kind")
    if ways is not None and trained_kind == "regression":
        raise ConfigError(
            f"--ways applies to classification checkpoints; '{ckpt}' was meta-trained on regression tasks"
        )
    if ways is not None and ways < 2:
        raise ConfigError(f"--ways must be at least 2, got {ways}")
    any_ways = serves_any_ways(state_cfg, trained_kind)
    if ways is not None and ways != t.ways and not any_ways:
        raise _learned_head_error(ckpt, state_cfg, t.ways, f"--ways {ways}")
    try:
        site = open_site(data, shots=shots, query=query, ways=t.ways if ways is None else ways, split=split)
    except TooFewClassesError as exc:
        if any_ways and ways is None:
            raise TooFewClassesError(
                f"{exc} (checkpoint '{ckpt}' was trained {t.ways}-way, but its head is rebuilt for each support set "
                f"(meta.head_init {state_cfg.meta.head_init!r}), so it serves any number of ways: pass --ways with "
                "fewer classes)"
            ) from exc
        raise
    meta = load_initialization(ckpt, site, label="meta", state=state)
    inits = [meta, random_initialization(meta, seed)]
    if compare is not None:
        inits.append(load_initialization(compare, site, label="compare"))
    log.info("site %s: %d %s tasks, %d episodes each, %d steps", site.path, len(site.tasks), site.kind, episodes, steps)
    eps = draw_episodes(site, episodes, seed)
    results = {
        init.label: {**evaluate_initialization(init, eps, steps=steps, chunk=init.config.eval.batch), "info": init.info}
        for init in inits
    }
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    personalized: dict[str, Any] = {"saved": False}
    if save_models:
        tasks, skipped = personalize(meta, site, steps=steps)
        manifest = save_personalized(out_dir / MODELS_DIR, meta, site, tasks, steps=steps, skipped=skipped)
        secs = [p.seconds for p in tasks.values()]
        personalized = {
            "saved": bool(tasks),
            "manifest": str(manifest),
            "tasks": sorted(tasks),
            "skipped": skipped,
            "seconds_per_task_median": float(np.median(secs)) if secs else None,
            "load_with": f"fedmeta.adaptation.load_personalized({str(out_dir)!r}).predict(task, x)",
        }
    report: dict[str, Any] = {
        "format": "fedmeta-adapt-report",
        "checkpoint": meta.info,
        "site": {
            "path": str(site.path),
            "folder": "tasks" if site.split == "train" else "heldout",
            "kind": site.kind,
            "tasks": [task.name for task in site.tasks],
            "input_shape": list(site.family.input_shape),
            "outputs": site.family.output_dim,
        },
        "settings": {
            "steps": steps,
            "shots": shots,
            "query": query,
            "ways": site.family.output_dim if site.kind == "classification" else None,
            "episodes": episodes,
            "seed": seed,
            "interval": "95% normal interval over support/query episodes; site level: stratified over tasks",
        },
        "initializations": results,
        "personalized": personalized,
        "adaptation_curve": str(out_dir / CURVE_NAME),
        "next": f"to join later federated rounds as a new SuperNode, see {DEPLOYMENT_DOC}",
    }
    plot_adaptation(report, out_dir / CURVE_NAME)
    report["wall_seconds"] = time.perf_counter() - started
    atomic_write_bytes(out_dir / REPORT_NAME, (json.dumps(_finite(report), indent=2) + "\n").encode())
    return report


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


_DISPLAY = {"meta": "meta-initialization", "random": "random initialization", "compare": "comparison"}


def _display(label: str, res: dict[str, Any]) -> str:
    if label == "compare":
        return f"{res.get('algorithm')}-trained initialization"
    if label == "meta":
        return f"meta-initialization ({res.get('algorithm')})"
    return _DISPLAY.get(label, label)


def format_summary(report: dict[str, Any]) -> str:
    """A short human summary of an adaptation report: the baselines side by side, then per task."""
    s, site = report["settings"], report["site"]
    shot = f"{s['ways']}-way {s['shots']}-shot" if site["kind"] == "classification" else f"{s['shots']}-shot"
    lines = [
        f"site {site['path']} ({site['folder']}/): {len(site['tasks'])} {site['kind']} tasks, {shot}, "
        f"{s['query']} query, {s['episodes']} episodes per task, {s['steps']} inner steps; mean ± 95% interval",
    ]
    metrics = ["loss"] + (["accuracy"] if site["kind"] == "classification" else [])
    header = f"  {'initialization':<36}" + "".join(f"{m + ' before':>22}{m + ' after':>22}" for m in metrics)
    lines.append(header)
    for label, res in report["initializations"].items():
        agg = res["aggregate"]
        row = f"  {_display(label, res):<36}"
        for m in metrics:
            row += f"{agg[f'pre_adapt_{m}']:>13.4f} ± {agg[f'pre_adapt_{m}_ci95']:<6.4f}"
            row += f"{agg[f'post_adapt_{m}']:>13.4f} ± {agg[f'post_adapt_{m}_ci95']:<6.4f}"
        lines.append(row)
    meta = report["initializations"]["meta"]
    key = "accuracy" if site["kind"] == "classification" else "loss"
    lines.append(f"  per task (meta-initialization, {key} before -> after):")
    for name, entry in list(meta["per_task"].items())[:10]:
        lines.append(
            f"    {name:<30} {entry[f'pre_adapt_{key}']:.4f} -> {entry[f'post_adapt_{key}']:.4f} ± "
            f"{entry[f'post_adapt_{key}_ci95']:.4f}"
        )
    if len(meta["per_task"]) > 10:
        lines.append(f"    ... {len(meta['per_task']) - 10} more in the report")
    per = meta["seconds"] / max(1, meta["adaptations"])
    lines.append(
        f"  adaptation time: {meta['adaptations']} episodes in {meta['seconds']:.2f} s ({per * 1000:.2f} ms each, "
        "vectorized)"
    )
    pers = report["personalized"]
    if pers.get("saved"):
        lines.append(
            f"  personalized models: {len(pers['tasks'])} in {Path(pers['manifest']).parent} "
            f"(median {1000 * (pers['seconds_per_task_median'] or 0):.1f} ms each); predict with "
            f"`fedmeta predict --models {Path(pers['manifest']).parent} --task NAME --input FILE`"
        )
    if pers.get("skipped"):
        lines.append(f"  not personalized: {', '.join(pers['skipped'])} (reasons in the report)")
    lines.append(
        f"  curve: {report['adaptation_curve']}; report: {Path(report['adaptation_curve']).parent / REPORT_NAME}"
    )
    lines.append(f"  next: {report['next']}")
    return "\n".join(lines)


def plot_adaptation(report: dict[str, Any], path: str | Path) -> Path:
    """Query metric against inner steps for every initialization, with 95% bands (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = ["loss"] + (["accuracy"] if report["site"]["kind"] == "classification" else [])
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 3.8), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        for label, res in report["initializations"].items():
            agg = res["aggregate"]
            ys = np.asarray(agg[f"{metric}_curve"], dtype=float)
            ci = np.asarray(agg[f"{metric}_curve_ci95"], dtype=float)
            xs = np.arange(len(ys))
            ax.plot(xs, ys, marker="o", ms=3, label=_display(label, res))
            ax.fill_between(xs, ys - ci, ys + ci, alpha=0.2)
        ax.set_xlabel("inner steps on the support set")
        ax.set_ylabel(f"query {metric}")
        if metric == "loss":
            ax.set_yscale("log")
        ax.set_title(f"new site: query {metric} (95% interval)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
