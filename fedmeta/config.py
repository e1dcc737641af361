"""Typed run configuration: frozen dataclasses loaded from YAML and validated at the boundary.

Every key of SPEC §10 is here (more are added as features need them; none is ever renamed).
:func:`load_config` reads a YAML file, applies ``--set dotted.key=value`` overrides and returns a
:class:`Config`; any unknown key, wrong type or out-of-range value raises :class:`ConfigError`
naming the dotted key and the offending value. :func:`validate` keeps the section-wide and
cross-section rules; the options of a component (a task family, a model, an aggregation rule)
are checked by the component itself (its ``check_config``), which :func:`validate` calls for
every component its registry holds; the component names come from those registries.
:func:`to_flat` / :func:`from_flat` give a config as dotted keys; Flower's ``run_config``
mapping is read and written in :mod:`fedmeta.flower.run_config`.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from fedmeta.errors import ConfigError
from fedmeta.registry import require as _require

__all__ = [
    "TaskConfig",
    "HFConfig",
    "ModelConfig",
    "MetaConfig",
    "FederationConfig",
    "PrivacyConfig",
    "EvalConfig",
    "EvalTaskConfig",
    "AdversarialConfig",
    "TRLearnerConfig",
    "ConstraintConfig",
    "GeneratorsConfig",
    "SimulationConfig",
    "Config",
    "evaluation_config",
    "with_task_ranges",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "to_dict",
    "to_flat",
    "from_flat",
    "TASK_NAMES",  # noqa: F822 (module __getattr__: the task-family registry's names)
    "MODEL_NAMES",  # noqa: F822 (module __getattr__: the model registry's names)
    "ALGORITHM_NAMES",  # noqa: F822 (module __getattr__: the algorithm registry's names)
    "PRIVACY_MODES",  # noqa: F822 (module __getattr__: the privacy-mechanism registry's names)
]

#: the generated regression families (a folder site may hold either kind)
REGRESSION_TASKS = ("sinusoid", "harmonic")
OUTER_OPTIMIZERS = ("adam", "sgd")
SAMPLINGS = ("uniform", "poisson")
ACCOUNTANTS = ("rdp", "prv", "gdp")
BUDGET_ACTIONS = ("refuse", "stop")

Range = tuple[float, float]


def __getattr__(name: str) -> tuple[str, ...]:
    """``TASK_NAMES``, ``MODEL_NAMES``, ``ALGORITHM_NAMES``, ``PRIVACY_MODES``: the names their registries hold.

    Looked up on use (PEP 562) because the registries import torch (and import this module) and
    this module does not.
    """
    if name == "TASK_NAMES":
        from fedmeta.tasks import TASK_FAMILIES

        return TASK_FAMILIES.names()
    if name == "MODEL_NAMES":
        from fedmeta.models import MODELS

        return MODELS.names()
    if name == "ALGORITHM_NAMES":
        from fedmeta.algorithms import ALGORITHMS

        return ALGORITHMS.names()
    if name == "PRIVACY_MODES":
        from fedmeta.privacy.mechanisms import MECHANISMS

        return MECHANISMS.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class HFConfig:
    """``task.hf``: a dataset read from a local path with Hugging Face ``datasets`` (docs/data-format.md).

    Used by ``task.name: hf`` (fedmeta/tasks/hf.py; the ``datasets`` extra). Nothing downloads:
    the path must hold the data.
    """

    # the local dataset: a `Dataset.save_to_disk` folder (disk), an image folder (imagefolder: CLASS/*.png,
    # or split/CLASS/*.png), or a parquet file or folder of *.parquet files (parquet)
    path: str | None = None
    format: str = "disk"
    # which split of a DatasetDict (ignored for a plain Dataset)
    split: str = "train"
    image_column: str = "image"
    label_column: str = "label"
    # Flower Datasets partitioner of the background classes' examples among clients:
    # iid | dirichlet | natural-id | pathological
    partitioner: str = "iid"
    # the column dirichlet / pathological partition by (null: label_column); natural-id needs it
    partition_by: str | None = None
    # dirichlet: concentration and the smallest partition it accepts
    alpha: float = 0.5
    min_partition_size: int = 0
    # pathological: classes per partition
    classes_per_partition: int = 2
    # classes held out for evaluation, the last ones by label (null: a fifth, at least task.ways)
    heldout_classes: int | None = None
    # 1: grayscale, 3: RGB; invert: 255 - pixel (dark strokes on white paper -> the glyphs' bright ink on black)
    channels: int = 1
    invert: bool = False


@dataclass(frozen=True)
class TaskConfig:
    """Which task family and how each task is split.

    ``shots``/``query`` count examples per task for regression and per class for classification.
    The range keys (``amplitude`` ...) override a regression family's defaults; ``None`` keeps
    them (sinusoid: MAML's amplitude [0.1, 5], phase [0, pi], x [-5, 5]).
    """

    name: str = "sinusoid"
    shots: int = 10
    query: int = 10
    ways: int = 5
    tasks_per_site: int | None = None
    amplitude: Range | None = None
    phase: Range | None = None
    x_range: Range | None = None
    omega: Range | None = None
    damping: Range | None = None
    noise_std: float = 0.0
    data_dir: str | None = None
    # folder: let several clients read the same site when a folder holds fewer sites than
    # federation.clients_total (client c reads site c mod sites). Off by default: one site's data
    # entering as several clients is not what a "client" means; every DP mode refuses it.
    share_sites: bool = False
    # glyphs (docs/glyphs.md): side of the images, fixed drawings per character, 90-degree
    # rotations as extra background classes, how background classes are split among clients
    # (iid | style | script | dirichlet), the Dirichlet concentration, the seed of the drawings,
    # and the folder of rendered drawings (null: $FEDMETA_CACHE_DIR, else ~/.cache/fedmeta).
    image_size: int = 28
    drawings: int = 20
    rotations: bool = False
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.5
    render_seed: int = 0
    cache_dir: str | None = None
    # femnist (docs/data-format.md): writers held out for evaluation, the last ones by id (null: a
    # tenth of them, at least one)
    heldout_writers: int | None = None
    # hf (docs/data-format.md): the local dataset and its Flower Datasets partitioner
    hf: HFConfig = field(default_factory=HFConfig)


@dataclass(frozen=True)
class ModelConfig:
    """Which network the meta-parameters belong to."""

    name: str = "mlp"
    hidden: tuple[int, ...] = (40, 40)
    # mlp: relu | tanh | silu | softplus (derivative constraints need a smooth one: not relu)
    activation: str = "relu"
    # conv4 (fedmeta/models/conv4.py): filters per block, normalization (batch | group | layer |
    # none; batch = per-task batch statistics, no running averages) and downsampling (stride:
    # stride-2 convolutions as MAML on Omniglot | max: 2x2 max-pooling as MAML on MiniImagenet).
    channels: int = 64
    norm: str = "batch"
    pool: str = "stride"


@dataclass(frozen=True)
class TRLearnerConfig:
    """``meta.trlearner``: TRLearner's consistency (fedmeta/algorithms/trlearner.py; docs/trlearner.md)."""

    # similarity heads K
    heads: int = 4
    # weight lambda of the consistency term (0: the base algorithm, bit for bit)
    weight: float = 0.1
    # agreement (related tasks' adapted models agree on task i's query inputs) | ensemble (the
    # relation-weighted ensemble of the other tasks' adapted models fits task i's query set)
    form: str = "agreement"
    # the examples a task embedding averages: support | support_query
    embedding: str = "support"
    # temperature of the row softmax that turns similarities into relations
    temperature: float = 0.1
    # the federated variant (fedmeta/aggregation/relations.py): off | weights (the server weights
    # clients by their relations, derived from the updates it receives) | consistency (the plain
    # mean pulled towards the relation-weighted one by `weight`); post-processing of privatized
    # updates only, refused under client-central DP
    federated: str = "off"


@dataclass(frozen=True)
class MetaConfig:
    """Inner loop (adaptation) and outer loop (server optimizer) settings."""

    algorithm: str = "maml"
    # one of fedmeta.algorithms.ALGORITHMS (maml, fomaml, reptile, metasgd, anil, fedavg, protonet;
    # protonet: Prototypical Networks, classification only, ignores inner_lr / inner_steps)
    # anil only: where the head's adaptation starts (learned | zero | prototypes; see
    # fedmeta/algorithms/anil.py); prototypes needs classification tasks
    head_init: str = "learned"
    inner_lr: float = 0.01
    inner_steps: int = 1
    outer_optimizer: str = "adam"
    outer_lr: float = 0.001
    outer_momentum: float = 0.0
    # The server optimizer's step size over the rounds (fedmeta/federation/stages.py OuterSchedule):
    # constant | linear | cosine (outer_lr to outer_lr_final) | step (x outer_gamma after each
    # round in outer_milestones).
    outer_schedule: str = "constant"
    outer_lr_final: float = 0.0
    outer_milestones: tuple[int, ...] = ()
    outer_gamma: float = 0.1
    tasks_per_client: int = 1
    local_steps: int = 1
    # Step size of the local SGD steps on the meta-parameters when local_steps > 1 (FedMeta /
    # FedAvg-style local meta-updates); null: the same as outer_lr.
    local_lr: float | None = None
    # An extra term of the outer objective: none | trlearner (options under meta.trlearner)
    regularizer: str = "none"
    trlearner: TRLearnerConfig = field(default_factory=TRLearnerConfig)

    @property
    def local_step_size(self) -> float:
        """The step size of local meta-steps (``local_lr``, or ``outer_lr`` when null)."""
        return self.outer_lr if self.local_lr is None else self.local_lr


@dataclass(frozen=True)
class FederationConfig:
    """How many clients exist, how many take part per round, and for how many rounds."""

    clients_total: int = 100
    clients_per_round: int = 25
    rounds: int = 1000
    min_replies: int | None = None
    round_timeout: float = 600.0
    # one of fedmeta.aggregation.AGGREGATORS: mean | median | trimmed_mean | weighted_median |
    # weighted_trimmed_mean | krum | multikrum | norm_bound; each rule owns and checks its options:
    aggregation: str = "mean"
    trim_fraction: float = 0.1  # trimmed_mean, weighted_trimmed_mean: share trimmed at each end
    krum_f: int = 1  # krum, multikrum: hostile clients tolerated (clients_per_round > 2 f + 2)
    multikrum_m: int | None = None  # multikrum: updates averaged (null: clients_per_round - krum_f)
    norm_bound: float | None = None  # norm_bound: L2 bound per update (null: the round's median norm)
    sampling: str = "uniform"
    # Seconds the server waits for clients to register and answer its start-up query.
    join_timeout: float = 600.0
    # Times a round is re-sent to the clients that failed when fewer than min_replies valid
    # replies arrived, before the run stops with InconsistentReplies.
    max_retries: int = 1


@dataclass(frozen=True)
class PrivacyConfig:
    """Differential privacy: what is protected, clipping, noise, and the budget."""

    mode: str = "none"
    clip_norm: float = 1.0
    noise_multiplier: float = 1.0
    delta: float = 1.0e-5
    target_epsilon: float | None = None
    accountant: str = "rdp"
    on_budget: str = "refuse"
    # Adaptive clipping (Andrew et al., 2021): the clip norm tracks the target_quantile of the
    # update norms; clip_norm above is its initial value. See docs/privacy.md.
    adaptive_clipping: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    clipped_count_stddev: float | None = None
    # Bounds on the adaptive clip norm (post-processing; they stop one client's clip bits from
    # driving it to 0 or infinity): floor and ceiling (null: clip_norm / 1000 and clip_norm x 1000)
    # and the largest factor it moves by in one round.
    clip_norm_min: float | None = None
    clip_norm_max: float | None = None
    clip_max_step: float = 2.0
    # Seed of the DP noise and of DP sampling. null (default): a secret seed from the OS, never
    # saved. An integer makes noise reproducible for tests; anyone who knows it can remove it.
    noise_seed: int | None = None
    # client-distributed only: t, the fewest clients whose masked updates must survive for a round's
    # secure sum to be unmasked (each client adds noise N(0, (noise_multiplier x clip_norm)^2 / t));
    # null: max(2, ceil(2/3 x federation.clients_per_round)). See docs/privacy.md.
    min_survivors: int | None = None

    @property
    def clip_norm_bounds(self) -> tuple[float, float]:
        """The adaptive clip norm's ``(floor, ceiling)``: ``clip_norm_min`` / ``clip_norm_max``, or
        ``clip_norm / 1000`` and ``clip_norm × 1000`` when null."""
        low = self.clip_norm / 1000.0 if self.clip_norm_min is None else self.clip_norm_min
        high = self.clip_norm * 1000.0 if self.clip_norm_max is None else self.clip_norm_max
        return low, high

    def count_stddev(self, clients_per_round: int) -> float:
        """Std of the noise on the clipped-count of adaptive clipping (``clipped_count_stddev``).

        Default (null): ``clients_per_round / 20`` for ``client-central`` (Andrew et al.'s
        choice for the cohort's sum) and ``noise_multiplier`` for ``client-local`` (each client
        noises its own bit); 0 when ``noise_multiplier`` is 0.
        """
        if self.clipped_count_stddev is not None:
            return self.clipped_count_stddev
        if self.noise_multiplier == 0:
            return 0.0
        from fedmeta.privacy.mechanisms import mechanism_for

        return mechanism_for(self.mode).default_count_stddev(self.noise_multiplier, clients_per_round)


@dataclass(frozen=True)
class EvalTaskConfig:
    """``eval.task``: range keys of a generated family that override ``task.*`` for the held-out tasks only.

    E.g. clients narrow (``task.amplitude: [0.1, 1.05]``) and evaluation over the full range
    (``eval.task.amplitude: [0.1, 5.0]``). ``null`` keeps the training value.
    """

    amplitude: Range | None = None
    phase: Range | None = None
    x_range: Range | None = None
    omega: Range | None = None
    damping: Range | None = None

    def overrides(self) -> dict[str, Range]:
        """The keys that are set."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass(frozen=True)
class EvalConfig:
    """Evaluation on held-out tasks that never appear in training."""

    tasks: int = 600
    steps: int = 10
    every: int = 100
    batch: int = 200
    # Server-side evaluation on TaskSource.eval_tasks() (needs the task data on the server).
    server: bool = True
    # Federated evaluation: clients asked every `every` rounds to adapt on their own held-out
    # tasks and return aggregate metrics only (0: none). Refused under every DP mode (un-noised).
    clients: int = 0
    # folder: a site folder (or folder of sites) that no client reads, whose heldout/ tasks the
    # server evaluates on instead of task.data_dir's; required for server-side evaluation over
    # site folders under DP (the sites' own held-out tasks are their data).
    data_dir: str | None = None
    # task-family range keys that override task.* for the server's held-out tasks (generated
    # families only), e.g. {amplitude: [0.1, 5.0]}: clients narrow, evaluation full range
    task: EvalTaskConfig = field(default_factory=EvalTaskConfig)


@dataclass(frozen=True)
class ConstraintConfig:
    """One soft constraint (fedmeta/generators/constraints.py): a penalty on adapted models at collocation points."""

    # bounded | lipschitz | periodic | symmetry | monotone | ode
    kind: str = ""
    weight: float = 1.0
    # collocation points, evenly spaced over x_range (null: the task family's input range)
    points: int = 64
    x_range: tuple[float, float] | None = None
    bound: float | None = None  # bounded: |y| <= bound
    constant: float | None = None  # lipschitz: |y'| <= constant
    period: float | None = None  # periodic: y(x + period) = y(x)
    parity: str = "odd"  # symmetry: odd | even, about center
    center: float = 0.0
    direction: str = "increasing"  # monotone: increasing | decreasing


@dataclass(frozen=True)
class AdversarialConfig:
    """``generators.adversarial``: the task generator, its discriminator and the admission filter
    (fedmeta/generators/adversarial.py, docs/generators.md)."""

    # proposals per round (the filter admits up to generators.tasks of them) and per ascent step
    candidates: int = 64
    # the generator's Adam ascent steps per round, and their step size
    steps: int = 1
    lr: float = 0.01
    # the generator's (and discriminator's) hidden width, and the generator's noise dimension
    hidden: int = 32
    noise_dim: int = 4
    # weight of the proposals' nearest-neighbour spread (against collapse onto one hardest task)
    diversity: float = 0.1
    # weight of generators.constraints' penalties on the proposed tasks' own functions
    penalty: float = 1.0
    # weight of the discriminator's realism score (0: no discriminator), and its Adam step size
    discriminator: float = 0.0
    discriminator_lr: float = 0.01
    # filter: admit a proposal whose post-adaptation loss is >= min_gap x the clients' declared
    # family's mean, at normalized task-space distance >= min_distance from the filter's memory
    min_gap: float = 1.0
    min_distance: float = 0.02
    memory: int = 256
    # manifold drift: the proposals' mean constraint violation above this
    max_drift: float = 0.1


@dataclass(frozen=True)
class GeneratorsConfig:
    """Higher-level constraint generators (SPEC §5; fedmeta/generators/, docs/generators.md)."""

    # none | direct (virtual tasks sampled from `family`, mixed into the aggregate on the server) |
    # adversarial (a generator proposes the hardest tasks in `family`'s box; a filter admits them)
    mode: str = "none"
    # K: 1 = plain federated meta-learning (no virtual tasks), 2 = a generator on the level-1
    # initialization
    depth: int = 1
    # lambda: the aggregate becomes (1 - lambda) * clients' + lambda * virtual-task meta-gradient
    weight: float = 0.0
    # lambda over the rounds: constant | linear | cosine (weight to weight_final) | step (x gamma
    # after each round in milestones)
    schedule: str = "constant"
    weight_final: float = 0.0
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1
    # virtual tasks per round
    tasks: int = 25
    # range keys of the generated family the virtual tasks are drawn from (as eval.task; empty:
    # the clients' task.* ranges)
    family: EvalTaskConfig = field(default_factory=EvalTaskConfig)
    # soft constraints, e.g. [{kind: ode, weight: 1.0, points: 64}]; each enters every client's
    # outer objective (and the virtual tasks') as a separable per-task penalty on adapted models
    constraints: tuple[ConstraintConfig, ...] = ()
    # where the virtual-task meta-gradient runs: auto (cuda when there is one) | cpu | cuda
    device: str = "auto"
    # failure signatures (docs/generators.md): warn | damp (halve lambda from then on) | stop
    on_failure: str = "warn"
    # meta-gradient explosion: the virtual meta-gradient's norm above this many times the clients'
    max_norm_ratio: float = 10.0
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)


@dataclass(frozen=True)
class SimulationConfig:
    """How ``fedmeta simulate`` maps clients onto Flower simulation nodes (docs/architecture.md, "Node pool")."""

    # true: a fixed pool of simulation nodes plays the logical clients (each round every node gets
    # the ids of the clients it plays and computes them in one batched pass); registered clients
    # cost nothing until sampled. false: one simulation node per registered client
    # (federation.clients_total nodes), e.g. for Flower mods that act per client. Site folders
    # (task.name folder) always get one node per site: a node never plays two sites' data
    pool: bool = True
    # nodes in the pool (null: one per Ray actor, i.e. CPUs / CPUs per client)
    nodes: int | None = None


@dataclass(frozen=True)
class Config:
    """A whole run configuration (SPEC §10)."""

    seed: int = 0
    task: TaskConfig = field(default_factory=TaskConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    meta: MetaConfig = field(default_factory=MetaConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    generators: GeneratorsConfig = field(default_factory=GeneratorsConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)

    @property
    def min_replies(self) -> int:
        """The minimum number of valid replies a round needs (default: half the cohort)."""
        if self.federation.min_replies is not None:
            return self.federation.min_replies
        return max(1, self.federation.clients_per_round // 2)


# ---------------------------------------------------------------------------------------------
# Generic conversion of nested mappings into the dataclasses above.


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_type_name(args[0])}"
        return f"a list of {len(args)} {' , '.join(_type_name(a) for a in args)}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert it (lists to tuples, int to float)."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ConfigError as exc:
                errors.append(exc)
        raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
    if origin is tuple:
        args = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config key '{key}' must be {_type_name(tp)}, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], key) for v in value)
        if len(value) != len(args):
            raise ConfigError(
                f"config key '{key}' must be {_type_name(tp)} (length {len(args)}), got {value!r}"
            )
        return tuple(_coerce(v, a, key) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"config key '{key}' must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"config key '{key}' must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out = float(value)
            if math.isnan(out):
                raise ConfigError(f"config key '{key}' must be a number, got NaN")
            return out
        if isinstance(value, str):
            try:  # PyYAML reads "1e-5" (no dot) as a string; accept it as the number it is
                return _coerce(float(value), float, key)
            except ValueError:
                pass
        raise ConfigError(f"config key '{key}' must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"config key '{key}' must be a string, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    raise ConfigError(f"config key '{key}' has unsupported type {tp!r}")  # pragma: no cover


def _build(cls: Any, data: Any, prefix: str) -> Any:
    where = f"'{prefix}'" if prefix else "the top level"
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config section {where} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(
                f"unknown config key '{dotted}' (valid keys in {where}: {', '.join(names)})"
            )
        kwargs[key] = _coerce(value, hints[key], dotted)
    return cls(**kwargs)


def with_task_ranges(cfg: Config, ranges: EvalTaskConfig) -> Config:
    """``cfg`` with the range keys set in ``ranges`` (``eval.task``, ``generators.family``) put in ``task``."""
    overrides: dict[str, Any] = dict(ranges.overrides())
    if not overrides:
        return cfg
    return dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, **overrides))


def check_task_ranges(cfg: Config, ranges: EvalTaskConfig, key: str) -> None:
    """Validate range overrides as the task families validate ``task.*``, errors naming ``key`` instead.

    Raises:
        ConfigError: e.g. naming ``eval.task.amplitude``.
    """
    from fedmeta.tasks import TASK_FAMILIES

    changed = with_task_ranges(cfg, ranges)
    for _, family in TASK_FAMILIES.items():
        try:
            family.check_config(changed)
        except ConfigError as exc:
            raise ConfigError(str(exc).replace("config key 'task.", f"config key '{key}.", 1)) from exc


def evaluation_config(cfg: Config) -> Config:
    """``cfg`` with ``eval.task``'s range keys in ``task``: the config the held-out tasks are drawn from."""
    return with_task_ranges(cfg, cfg.eval.task)


def _validate_regularizer(cfg: Config) -> None:
    """``meta.regularizer``: a registered objective term, its own options, and the rules across sections."""
    from fedmeta.algorithms import ALGORITHMS
    from fedmeta.algorithms.engine import OBJECTIVE_TERMS
    from fedmeta.privacy.mechanisms import MECHANISMS

    me = cfg.meta
    if me.trlearner.federated != "off":
        from fedmeta.aggregation.relations import RelationWeighted

        RelationWeighted.check_config(cfg)
    if me.regularizer == "none":
        return
    _require(
        me.regularizer in OBJECTIVE_TERMS,
        "meta.regularizer",
        me.regularizer,
        f"must be none or one of {', '.join(OBJECTIVE_TERMS)}",
    )
    term = OBJECTIVE_TERMS.get(me.regularizer)
    term.check_config(cfg)
    rule = ALGORITHMS.get(me.algorithm).update_rule
    _require(
        rule in ("exact", "first_order", "reptile"),
        "meta.regularizer",
        me.regularizer,
        f"needs an algorithm that adapts to each task; meta.algorithm {me.algorithm!r} does not",
    )
    _require(
        me.local_steps == 1,
        "meta.regularizer",
        me.regularizer,
        "is not supported with several local meta-steps (meta.local_steps > 1) yet",
    )
    MECHANISMS.get(cfg.privacy.mode)().check_objective_terms([term])


def _validate_outer_schedule(cfg: Config) -> None:
    """``meta.outer_schedule`` and its keys (fedmeta/federation/stages.py)."""
    from fedmeta.federation.stages import OUTER_SCHEDULES

    me = cfg.meta
    _require(
        me.outer_schedule in OUTER_SCHEDULES,
        "meta.outer_schedule",
        me.outer_schedule,
        f"must be one of {', '.join(OUTER_SCHEDULES)}",
    )
    _require(
        0 <= me.outer_lr_final <= me.outer_lr and math.isfinite(me.outer_lr_final),
        "meta.outer_lr_final",
        me.outer_lr_final,
        "must be in [0, meta.outer_lr]",
    )
    _require(0 < me.outer_gamma <= 1, "meta.outer_gamma", me.outer_gamma, "must be in (0, 1]")
    ms = list(me.outer_milestones)
    _require(
        all(1 <= m < cfg.federation.rounds for m in ms) and ms == sorted(set(ms)),
        "meta.outer_milestones",
        ms,
        "must be increasing rounds in 1 .. federation.rounds - 1",
    )
    if me.outer_schedule == "step":
        _require(bool(ms), "meta.outer_milestones", ms, "must name at least one round for meta.outer_schedule 'step'")


def validate(cfg: Config) -> Config:
    """Check value constraints and cross-key consistency.

    Args:
        cfg: a structurally valid config.

    Returns:
        ``cfg`` unchanged.

    Raises:
        ConfigError: naming the first key whose value is out of range or inconsistent.
    """
    # The component registries (which import torch) are imported here, not at module level, so
    # that importing fedmeta.config stays light; each component validates its own options.
    from fedmeta.aggregation import AGGREGATORS
    from fedmeta.models import MODELS
    from fedmeta.privacy.mechanisms import MECHANISMS
    from fedmeta.tasks import TASK_FAMILIES

    t, m, me, f, p, e = cfg.task, cfg.model, cfg.meta, cfg.federation, cfg.privacy, cfg.eval
    _require(cfg.seed >= 0, "seed", cfg.seed, "must be a non-negative integer")
    _require(t.name in TASK_FAMILIES, "task.name", t.name, f"must be one of {', '.join(TASK_FAMILIES)}")
    _require(t.shots >= 1, "task.shots", t.shots, "must be at least 1")
    _require(t.query >= 1, "task.query", t.query, "must be at least 1")
    _require(t.ways >= 2, "task.ways", t.ways, "must be at least 2")
    _require(
        t.tasks_per_site is None or t.tasks_per_site >= 1,
        "task.tasks_per_site",
        t.tasks_per_site,
        "must be null or at least 1",
    )
    for _, family in TASK_FAMILIES.items():
        family.check_config(cfg)
    if cfg.eval.task.overrides():
        _require(
            t.name in REGRESSION_TASKS,
            "eval.task",
            cfg.eval.task.overrides(),
            f"overrides the range keys of a generated family ({', '.join(REGRESSION_TASKS)}); task.name is {t.name!r}",
        )
        check_task_ranges(cfg, cfg.eval.task, "eval.task")

    _require(m.name in MODELS, "model.name", m.name, f"must be one of {', '.join(MODELS)}")
    for _, model in MODELS.items():
        model.check_config(cfg)

    # the algorithm registry owns the names and each algorithm its option rules (imported here:
    # the algorithms import the models, which import this module)
    from fedmeta.algorithms import ALGORITHMS

    ALGORITHMS.get(me.algorithm).check_options(
        kind="regression" if t.name in REGRESSION_TASKS else None, head_init=me.head_init, task=t.name
    )
    _require(me.inner_lr > 0 and math.isfinite(me.inner_lr), "meta.inner_lr", me.inner_lr, "must be a positive number")
    _require(me.inner_steps >= 1, "meta.inner_steps", me.inner_steps, "must be at least 1")
    _require(
        me.outer_optimizer in OUTER_OPTIMIZERS,
        "meta.outer_optimizer",
        me.outer_optimizer,
        f"must be one of {', '.join(OUTER_OPTIMIZERS)}",
    )
    _require(me.outer_lr > 0 and math.isfinite(me.outer_lr), "meta.outer_lr", me.outer_lr, "must be a positive number")
    _require(0 <= me.outer_momentum < 1, "meta.outer_momentum", me.outer_momentum, "must be in [0, 1)")
    _validate_outer_schedule(cfg)
    _require(me.tasks_per_client >= 1, "meta.tasks_per_client", me.tasks_per_client, "must be at least 1")
    _require(me.local_steps >= 1, "meta.local_steps", me.local_steps, "must be at least 1")
    _require(
        me.local_lr is None or (me.local_lr > 0 and math.isfinite(me.local_lr)),
        "meta.local_lr",
        me.local_lr,
        "must be null or a positive number",
    )
    _validate_regularizer(cfg)
    from fedmeta.generators.constraints import check_constraints

    check_constraints(cfg, kind="regression" if t.name in REGRESSION_TASKS else None)
    from fedmeta.generators.virtual import check_generators

    check_generators(cfg)
    if t.tasks_per_site is not None:
        why = f"must not exceed task.tasks_per_site ({t.tasks_per_site})"
        _require(me.tasks_per_client <= t.tasks_per_site, "meta.tasks_per_client", me.tasks_per_client, why)

    _require(f.clients_total >= 1, "federation.clients_total", f.clients_total, "must be at least 1")
    _require(f.clients_per_round >= 1, "federation.clients_per_round", f.clients_per_round, "must be at least 1")
    why = f"must not exceed federation.clients_total ({f.clients_total})"
    _require(f.clients_per_round <= f.clients_total, "federation.clients_per_round", f.clients_per_round, why)
    _require(f.rounds >= 1, "federation.rounds", f.rounds, "must be at least 1")
    _require(
        f.min_replies is None or 1 <= f.min_replies <= f.clients_per_round,
        "federation.min_replies",
        f.min_replies,
        f"must be null or between 1 and federation.clients_per_round ({f.clients_per_round})",
    )
    _require(f.round_timeout > 0, "federation.round_timeout", f.round_timeout, "must be positive (seconds)")
    _require(
        f.aggregation in AGGREGATORS,
        "federation.aggregation",
        f.aggregation,
        f"must be one of {', '.join(AGGREGATORS)}",
    )
    for _, rule in AGGREGATORS.items():
        rule.check_config(cfg)
    _require(f.sampling in SAMPLINGS, "federation.sampling", f.sampling, f"must be one of {', '.join(SAMPLINGS)}")
    _require(f.join_timeout > 0, "federation.join_timeout", f.join_timeout, "must be positive (seconds)")
    _require(f.max_retries >= 0, "federation.max_retries", f.max_retries, "must be a non-negative integer")
    nodes = cfg.simulation.nodes
    _require(nodes is None or nodes >= 1, "simulation.nodes", nodes, "must be null (one per Ray actor) or at least 1")

    _require(p.mode in MECHANISMS, "privacy.mode", p.mode, f"must be one of {', '.join(MECHANISMS)}")
    _require(
        p.clip_norm > 0 and math.isfinite(p.clip_norm), "privacy.clip_norm", p.clip_norm, "must be a positive number"
    )
    _require(
        p.noise_multiplier >= 0 and math.isfinite(p.noise_multiplier),
        "privacy.noise_multiplier",
        p.noise_multiplier,
        "must be a non-negative number",
    )
    _require(0 < p.delta < 1, "privacy.delta", p.delta, "must lie strictly between 0 and 1")
    _require(
        p.target_epsilon is None or p.target_epsilon > 0,
        "privacy.target_epsilon",
        p.target_epsilon,
        "must be null or a positive number",
    )
    _require(
        p.accountant in ACCOUNTANTS, "privacy.accountant", p.accountant, f"must be one of {', '.join(ACCOUNTANTS)}"
    )
    _require(
        p.on_budget in BUDGET_ACTIONS, "privacy.on_budget", p.on_budget, f"must be one of {', '.join(BUDGET_ACTIONS)}"
    )
    _require(
        0 < p.target_quantile < 1, "privacy.target_quantile", p.target_quantile, "must lie strictly between 0 and 1"
    )
    _require(p.clip_lr > 0 and math.isfinite(p.clip_lr), "privacy.clip_lr", p.clip_lr, "must be a positive number")
    for key, bound in (("privacy.clip_norm_min", p.clip_norm_min), ("privacy.clip_norm_max", p.clip_norm_max)):
        _require(bound is None or (bound > 0 and math.isfinite(bound)), key, bound, "must be null or a positive number")
    low, high = p.clip_norm_bounds
    _require(low <= p.clip_norm, "privacy.clip_norm_min", low, f"must not exceed privacy.clip_norm ({p.clip_norm})")
    _require(high >= p.clip_norm, "privacy.clip_norm_max", high, f"must not be below privacy.clip_norm ({p.clip_norm})")
    _require(
        p.clip_max_step > 1 and math.isfinite(p.clip_max_step),
        "privacy.clip_max_step",
        p.clip_max_step,
        "must be a number above 1 (the largest factor the adaptive clip norm moves by in a round)",
    )
    _require(
        p.clipped_count_stddev is None or (p.clipped_count_stddev >= 0 and math.isfinite(p.clipped_count_stddev)),
        "privacy.clipped_count_stddev",
        p.clipped_count_stddev,
        "must be null or a non-negative number",
    )
    _require(
        p.noise_seed is None or p.noise_seed >= 0,
        "privacy.noise_seed",
        p.noise_seed,
        "must be null or a non-negative integer",
    )
    # the rules that depend on the mode (adaptive clipping, cohort sampling, the aggregation rule,
    # a known task pool) belong to its mechanism
    MECHANISMS.get(p.mode)().check_config(cfg)

    _require(e.tasks >= 1, "eval.tasks", e.tasks, "must be at least 1")
    _require(e.steps >= 1, "eval.steps", e.steps, "must be at least 1")
    _require(e.every >= 1, "eval.every", e.every, "must be at least 1")
    _require(e.batch >= 1, "eval.batch", e.batch, "must be at least 1")
    _require(
        0 <= e.clients <= f.clients_total,
        "eval.clients",
        e.clients,
        f"must be between 0 and federation.clients_total ({f.clients_total})",
    )
    _require(
        e.server or e.clients > 0,
        "eval.server",
        e.server,
        "may be false only when eval.clients > 0 (something must evaluate)",
    )

    fits = TASK_FAMILIES.get(t.name).models
    if fits is not None:
        why = f"must be {' or '.join(map(repr, fits))} for task.name '{t.name}'"
        _require(m.name in fits, "model.name", m.name, why)
    return cfg


def config_from_dict(data: Any, *, source: str = "config") -> Config:
    """Build and validate a :class:`Config` from a nested mapping.

    Raises:
        ConfigError: on unknown keys, wrong types or invalid values (message names the key).
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source} must hold a YAML mapping at the top level, got {type(data).__name__}")
    return validate(_declared_defaults(_build(Config, data, ""), data))


def _given_keys(data: dict[str, Any], prefix: str = "") -> set[str]:
    """The dotted keys a nested mapping sets (sections included)."""
    keys: set[str] = set()
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        keys.add(dotted)
        if isinstance(value, dict):
            keys |= _given_keys(value, dotted)
    return keys


def _declared_defaults(cfg: Config, data: dict[str, Any]) -> Config:
    """Options the privacy mechanism's declarations imply where ``data`` leaves them unset."""
    from fedmeta.privacy.mechanisms import MECHANISMS

    if cfg.privacy.mode not in MECHANISMS:
        return cfg  # validate() names the bad mode
    return MECHANISMS.get(cfg.privacy.mode)().with_declared_defaults(cfg, given=_given_keys(data))


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``dotted.key=value`` overrides to a nested mapping (values parsed as YAML).

    Raises:
        ConfigError: if an override is not of the form ``key=value`` or names an unknown key.
    """
    out = _deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects dotted.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        if not all(parts):
            raise ConfigError(f"--set has an empty key segment in {key!r}")
        cls: Any = Config
        node = out
        for i, part in enumerate(parts):
            names = {f.name: f for f in dataclasses.fields(cls)}
            if part not in names:
                where = ".".join(parts[:i]) or "the top level"
                raise ConfigError(
                    f"unknown config key '{key}' in --set (valid keys in {where}: {', '.join(names)})"
                )
            hint = typing.get_type_hints(cls)[part]
            if i == len(parts) - 1:
                if dataclasses.is_dataclass(hint):
                    raise ConfigError(f"--set {key} names a section; set one of its keys instead")
                node[part] = _parse_scalar(raw)
            else:
                if not dataclasses.is_dataclass(hint):
                    raise ConfigError(f"unknown config key '{key}' in --set ('{part}' is not a section)")
                child = node.get(part)
                if child is None:
                    child = {}
                if not isinstance(child, dict):
                    raise ConfigError(f"config section '{'.'.join(parts[: i + 1])}' must be a mapping")
                node[part] = child
                node = child
                cls = hint
    return out


def _deepcopy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deepcopy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deepcopy(v) for v in data]
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Read a YAML config file, apply ``--set`` overrides and validate.

    Args:
        path: the YAML file.
        overrides: ``dotted.key=value`` strings.

    Returns:
        The validated :class:`Config`.

    Raises:
        ConfigError: if the file is missing or unreadable, is not valid YAML, or any key or value
            is invalid. The message names the file and the key.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{p}' does not exist or is not a file")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file '{p}' cannot be read: {exc}") from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"config file '{p}' is not valid YAML{where}: {problem}") from exc
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{p}' must hold a YAML mapping, got {type(data).__name__}")
    data = apply_overrides(data, overrides or [])
    try:
        return config_from_dict(data, source=f"config file '{p}'")
    except ConfigError as exc:
        raise ConfigError(f"{exc} (in {p})") from exc


def to_dict(cfg: Config) -> dict[str, Any]:
    """Return the config as plain nested dicts/lists (YAML/JSON/checkpoint friendly)."""

    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(dataclasses.asdict(cfg))


def to_flat(cfg: Config) -> dict[str, Any]:
    """Flatten a config to ``{"dotted.key": scalar}``; lists and null become YAML strings.

    This is the form Flower's ``run_config`` can carry (scalars only).
    """
    out: dict[str, Any] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        elif node is None or isinstance(node, list):
            out[prefix] = yaml.safe_dump(node, default_flow_style=True).strip().removesuffix("...").strip()
        else:
            out[prefix] = node

    walk("", to_dict(cfg))
    return out


def from_flat(flat: dict[str, Any]) -> Config:
    """Inverse of :func:`to_flat`: rebuild and validate a config from dotted keys.

    Raises:
        ConfigError: on unknown keys or invalid values.
    """
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, str) and (value == "null" or value.startswith("[")):
            value = yaml.safe_load(value)
        node[parts[-1]] = value
    return config_from_dict(nested, source="run_config")
