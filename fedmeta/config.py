"""Typed run configuration: frozen dataclasses loaded from YAML and validated in one place.

Every key of SPEC §10 is here (more are added as features need them; none is ever renamed).
:func:`load_config` reads a YAML file, applies ``--set dotted.key=value`` overrides and returns a
:class:`Config`; any unknown key, wrong type or out-of-range value raises :class:`ConfigError`
naming the dotted key and the offending value. Flower's flat ``run_config`` mapping is converted
here too (:func:`to_flat` / :func:`from_flat`) and nowhere else.
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

__all__ = [
    "TaskConfig",
    "ModelConfig",
    "MetaConfig",
    "FederationConfig",
    "PrivacyConfig",
    "EvalConfig",
    "Config",
    "load_config",
    "config_from_dict",
    "apply_overrides",
    "to_dict",
    "to_flat",
    "from_flat",
    "RunOptions",
    "RUN_CONFIG_KEYS",
    "config_from_run_config",
    "run_config_for",
    "TASK_NAMES",
    "MODEL_NAMES",
    "ALGORITHM_NAMES",
    "PRIVACY_MODES",
]

TASK_NAMES = ("sinusoid", "harmonic", "glyphs", "folder")
#: the generated regression families (a folder site may hold either kind)
REGRESSION_TASKS = ("sinusoid", "harmonic")
MODEL_NAMES = ("mlp", "conv4")
PRIVACY_MODES = ("none", "client-central", "client-local", "task")
OUTER_OPTIMIZERS = ("adam", "sgd")
AGGREGATIONS = ("mean", "median", "trimmed_mean")
SAMPLINGS = ("uniform", "poisson")
ACCOUNTANTS = ("rdp", "prv", "gdp")
BUDGET_ACTIONS = ("refuse", "stop")
GLYPH_PARTITIONS = ("iid", "style", "script", "dirichlet")
CONV_NORMS = ("batch", "group", "layer", "none")
CONV_POOLS = ("stride", "max")

Range = tuple[float, float]


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


@dataclass(frozen=True)
class ModelConfig:
    """Which network the meta-parameters belong to."""

    name: str = "mlp"
    hidden: tuple[int, ...] = (40, 40)
    # conv4 (fedmeta/models/conv4.py): filters per block, normalization (batch | group | layer |
    # none; batch = per-task batch statistics, no running averages) and downsampling (stride:
    # stride-2 convolutions as MAML on Omniglot | max: 2x2 max-pooling as MAML on MiniImagenet).
    channels: int = 64
    norm: str = "batch"
    pool: str = "stride"


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
    tasks_per_client: int = 1
    local_steps: int = 1
    # Step size of the local SGD steps on the meta-parameters when local_steps > 1 (FedMeta /
    # FedAvg-style local meta-updates); null: the same as outer_lr.
    local_lr: float | None = None

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
    aggregation: str = "mean"
    trim_fraction: float = 0.1
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
    # Seed of the DP noise and of DP sampling. null (default): a secret seed from the OS, never
    # saved. An integer makes noise reproducible for tests; anyone who knows it can remove it.
    noise_seed: int | None = None

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
        if self.mode == "client-local":
            return self.noise_multiplier
        return clients_per_round / 20.0


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
    # tasks and return aggregate metrics only (0: none).
    clients: int = 0


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

    @property
    def min_replies(self) -> int:
        """The minimum number of valid replies a round needs (default: half the cohort)."""
        if self.federation.min_replies is not None:
            return self.federation.min_replies
        return max(1, self.federation.clients_per_round // 2)


# ---------------------------------------------------------------------------------------------
# Generic conversion of nested mappings into the dataclasses above.


def __getattr__(name: str) -> Any:
    """``ALGORITHM_NAMES``: the algorithm registry's names (read when asked for; the registry imports this module)."""
    if name == "ALGORITHM_NAMES":
        from fedmeta.algorithms import ALGORITHMS

        return ALGORITHMS.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


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


def _require(cond: bool, key: str, value: Any, why: str) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}' {why}, got {value!r}")


def _check_range(key: str, value: Range | None, *, low: float | None = None) -> None:
    if value is None:
        return
    lo, hi = value
    _require(lo <= hi, key, list(value), "must be [low, high] with low <= high")
    if low is not None:
        _require(lo >= low, key, list(value), f"must lie at or above {low}")


def validate(cfg: Config) -> Config:
    """Check value constraints and cross-key consistency.

    Args:
        cfg: a structurally valid config.

    Returns:
        ``cfg`` unchanged.

    Raises:
        ConfigError: naming the first key whose value is out of range or inconsistent.
    """
    t, m, me, f, p, e = cfg.task, cfg.model, cfg.meta, cfg.federation, cfg.privacy, cfg.eval
    _require(cfg.seed >= 0, "seed", cfg.seed, "must be a non-negative integer")
    _require(t.name in TASK_NAMES, "task.name", t.name, f"must be one of {', '.join(TASK_NAMES)}")
    _require(t.shots >= 1, "task.shots", t.shots, "must be at least 1")
    _require(t.query >= 1, "task.query", t.query, "must be at least 1")
    _require(t.ways >= 2, "task.ways", t.ways, "must be at least 2")
    _require(
        t.tasks_per_site is None or t.tasks_per_site >= 1,
        "task.tasks_per_site",
        t.tasks_per_site,
        "must be null or at least 1",
    )
    _check_range("task.amplitude", t.amplitude)
    _check_range("task.phase", t.phase)
    _check_range("task.x_range", t.x_range)
    _check_range("task.omega", t.omega, low=0.0)
    _check_range("task.damping", t.damping, low=0.0)
    if t.damping is not None:
        _require(t.damping[1] < 1.0, "task.damping", list(t.damping), "must stay below 1 (underdamped)")
    _require(t.noise_std >= 0, "task.noise_std", t.noise_std, "must be >= 0")
    if t.name == "folder" and e.server:
        # A deployment server without site data (each SuperNode has its own data-dir) leaves it
        # null; it then evaluates only through the sites (eval.server false, eval.clients > 0).
        _require(
            bool(t.data_dir),
            "task.data_dir",
            t.data_dir,
            "must name a site folder for task.name 'folder' (a deployment server without data: set eval.server false and eval.clients > 0)",
        )
    _require(16 <= t.image_size <= 128, "task.image_size", t.image_size, "must be between 16 and 128 pixels")
    _require(t.drawings >= 2, "task.drawings", t.drawings, "must be at least 2")
    _require(t.partition in GLYPH_PARTITIONS, "task.partition", t.partition, f"must be one of {', '.join(GLYPH_PARTITIONS)}")
    _require(t.dirichlet_alpha > 0 and math.isfinite(t.dirichlet_alpha), "task.dirichlet_alpha", t.dirichlet_alpha, "must be a positive number")
    _require(t.render_seed >= 0, "task.render_seed", t.render_seed, "must be a non-negative integer")
    _require(t.cache_dir is None or bool(t.cache_dir.strip()), "task.cache_dir", t.cache_dir, "must be null or a folder path")
    if t.name == "glyphs":
        _require(
            t.shots + t.query <= t.drawings,
            "task.query",
            t.query,
            f"plus task.shots ({t.shots}) must not exceed task.drawings ({t.drawings}), the drawings per character",
        )

    _require(m.name in MODEL_NAMES, "model.name", m.name, f"must be one of {', '.join(MODEL_NAMES)}")
    _require(all(h >= 1 for h in m.hidden) and len(m.hidden) >= 1, "model.hidden", list(m.hidden), "must be a non-empty list of positive widths")
    _require(m.channels >= 1, "model.channels", m.channels, "must be at least 1")
    _require(m.norm in CONV_NORMS, "model.norm", m.norm, f"must be one of {', '.join(CONV_NORMS)}")
    _require(m.pool in CONV_POOLS, "model.pool", m.pool, f"must be one of {', '.join(CONV_POOLS)}")
    if m.name == "conv4" and m.norm == "group":
        _require(m.channels % 8 == 0, "model.channels", m.channels, "must be a multiple of 8 for model.norm 'group' (8 groups)")

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
    _require(me.tasks_per_client >= 1, "meta.tasks_per_client", me.tasks_per_client, "must be at least 1")
    _require(me.local_steps >= 1, "meta.local_steps", me.local_steps, "must be at least 1")
    _require(
        me.local_lr is None or (me.local_lr > 0 and math.isfinite(me.local_lr)),
        "meta.local_lr",
        me.local_lr,
        "must be null or a positive number",
    )
    if t.tasks_per_site is not None:
        _require(
            me.tasks_per_client <= t.tasks_per_site,
            "meta.tasks_per_client",
            me.tasks_per_client,
            f"must not exceed task.tasks_per_site ({t.tasks_per_site})",
        )

    _require(f.clients_total >= 1, "federation.clients_total", f.clients_total, "must be at least 1")
    _require(f.clients_per_round >= 1, "federation.clients_per_round", f.clients_per_round, "must be at least 1")
    _require(
        f.clients_per_round <= f.clients_total,
        "federation.clients_per_round",
        f.clients_per_round,
        f"must not exceed federation.clients_total ({f.clients_total})",
    )
    _require(f.rounds >= 1, "federation.rounds", f.rounds, "must be at least 1")
    _require(
        f.min_replies is None or 1 <= f.min_replies <= f.clients_per_round,
        "federation.min_replies",
        f.min_replies,
        f"must be null or between 1 and federation.clients_per_round ({f.clients_per_round})",
    )
    _require(f.round_timeout > 0, "federation.round_timeout", f.round_timeout, "must be positive (seconds)")
    _require(f.aggregation in AGGREGATIONS, "federation.aggregation", f.aggregation, f"must be one of {', '.join(AGGREGATIONS)}")
    _require(0 <= f.trim_fraction < 0.5, "federation.trim_fraction", f.trim_fraction, "must be in [0, 0.5)")
    _require(f.sampling in SAMPLINGS, "federation.sampling", f.sampling, f"must be one of {', '.join(SAMPLINGS)}")
    _require(f.join_timeout > 0, "federation.join_timeout", f.join_timeout, "must be positive (seconds)")
    _require(f.max_retries >= 0, "federation.max_retries", f.max_retries, "must be a non-negative integer")

    _require(p.mode in PRIVACY_MODES, "privacy.mode", p.mode, f"must be one of {', '.join(PRIVACY_MODES)}")
    _require(p.clip_norm > 0 and math.isfinite(p.clip_norm), "privacy.clip_norm", p.clip_norm, "must be a positive number")
    _require(p.noise_multiplier >= 0 and math.isfinite(p.noise_multiplier), "privacy.noise_multiplier", p.noise_multiplier, "must be a non-negative number")
    _require(0 < p.delta < 1, "privacy.delta", p.delta, "must lie strictly between 0 and 1")
    _require(
        p.target_epsilon is None or p.target_epsilon > 0,
        "privacy.target_epsilon",
        p.target_epsilon,
        "must be null or a positive number",
    )
    _require(p.accountant in ACCOUNTANTS, "privacy.accountant", p.accountant, f"must be one of {', '.join(ACCOUNTANTS)}")
    _require(p.on_budget in BUDGET_ACTIONS, "privacy.on_budget", p.on_budget, f"must be one of {', '.join(BUDGET_ACTIONS)}")
    _require(0 < p.target_quantile < 1, "privacy.target_quantile", p.target_quantile, "must lie strictly between 0 and 1")
    _require(p.clip_lr > 0 and math.isfinite(p.clip_lr), "privacy.clip_lr", p.clip_lr, "must be a positive number")
    _require(
        p.clipped_count_stddev is None or (p.clipped_count_stddev >= 0 and math.isfinite(p.clipped_count_stddev)),
        "privacy.clipped_count_stddev",
        p.clipped_count_stddev,
        "must be null or a non-negative number",
    )
    _require(p.noise_seed is None or p.noise_seed >= 0, "privacy.noise_seed", p.noise_seed, "must be null or a non-negative integer")
    if p.adaptive_clipping:
        _require(
            p.mode in ("client-central", "client-local"),
            "privacy.adaptive_clipping",
            p.adaptive_clipping,
            f"applies to privacy.mode client-central or client-local only (mode is '{p.mode}')",
        )
        count_std = p.count_stddev(f.clients_per_round)
        # Andrew et al. (2021), Thm. 1: the update noise left after paying for the noisy count is
        # (z^-2 - (2 sigma_b)^-2)^-1/2, which exists only when 2 sigma_b > z.
        _require(
            p.noise_multiplier == 0 or 2 * count_std > p.noise_multiplier,
            "privacy.clipped_count_stddev",
            count_std,
            f"must exceed privacy.noise_multiplier / 2 = {p.noise_multiplier / 2:g} for adaptive clipping "
            "(the clipped-count noise is paid out of the noise budget; null means "
            + ("noise_multiplier" if p.mode == "client-local" else "clients_per_round / 20")
            + ")",
        )
    if p.mode == "client-central":
        # The accountant's amplification by subsampling assumes each client joins a round
        # independently with probability q = clients_per_round / clients_total.
        _require(
            f.sampling == "poisson",
            "federation.sampling",
            f.sampling,
            "must be 'poisson' for privacy.mode 'client-central' (the privacy accountant assumes Poisson "
            "sampling of clients with rate clients_per_round / clients_total)",
        )
        _require(
            f.aggregation == "mean",
            "federation.aggregation",
            f.aggregation,
            "must be 'mean' for privacy.mode 'client-central' (the noise is calibrated to the clipped sum)",
        )
    if p.mode == "task":
        _require(
            t.tasks_per_site is not None or t.name == "folder",
            "task.tasks_per_site",
            t.tasks_per_site,
            "must be set for privacy.mode 'task' (the site's fixed pool of tasks is what task-level DP "
            "protects; its sampling rate is meta.tasks_per_client / task.tasks_per_site)",
        )

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
    _require(e.server or e.clients > 0, "eval.server", e.server, "may be false only when eval.clients > 0 (something must evaluate)")

    needs_images = t.name == "glyphs"
    if needs_images:
        _require(m.name == "conv4", "model.name", m.name, "must be 'conv4' for task.name 'glyphs'")
    if t.name in ("sinusoid", "harmonic"):
        _require(m.name == "mlp", "model.name", m.name, f"must be 'mlp' for task.name '{t.name}'")
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
    return validate(_build(Config, data, ""))


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


# ---------------------------------------------------------------------------------------------
# Flower's run_config (``[tool.flwr.app.config]`` in pyproject.toml, ``--run-config`` of flwr run).

#: The keys of ``[tool.flwr.app.config]``. Flower only lets ``flwr run --run-config`` override
#: keys that pyproject.toml declares, so every key the apps read is listed there.
RUN_CONFIG_KEYS = ("config-file", "config-yaml", "overrides", "out-dir", "resume")


@dataclass(frozen=True)
class RunOptions:
    """What a Flower run needs besides the :class:`Config`: where outputs go, and whether to resume."""

    out_dir: str = ""
    resume: bool = False


def config_from_run_config(run_config: dict[str, Any], *, base_dirs: tuple[Path, ...] = ()) -> tuple[Config, RunOptions]:
    """Build the run's :class:`Config` from Flower's ``run_config`` mapping.

    Keys (all optional):

    * ``config-yaml``: the whole config as YAML text (wins over ``config-file``);
    * ``config-file``: a YAML config file, absolute or relative to one of ``base_dirs`` (the app
      directory, which Flower's app bundle ships with ``configs/``) or the current directory;
    * ``overrides``: space-separated ``dotted.key=value`` items, exactly like ``--set``;
    * any dotted config key (``meta.inner_lr``), as :func:`to_flat` writes them;
    * ``out-dir`` and ``resume``: returned as :class:`RunOptions`.

    Raises:
        ConfigError: for an unknown key, an unreadable file, or an invalid config.
    """
    import shlex

    flat = dict(run_config)
    options = RunOptions(out_dir=str(flat.pop("out-dir", "") or ""), resume=bool(flat.pop("resume", False)))
    text = str(flat.pop("config-yaml", "") or "")
    path = str(flat.pop("config-file", "") or "")
    overrides = shlex.split(str(flat.pop("overrides", "") or ""))
    for key, value in flat.items():
        if "." not in key:
            raise ConfigError(f"unknown run_config key '{key}' (known: {', '.join(RUN_CONFIG_KEYS)} and dotted config keys)")
        if isinstance(value, str) and (value == "null" or value.startswith("[")):
            value = yaml.safe_load(value)
        overrides.append(f"{key}={yaml.safe_dump(value, default_flow_style=True).strip().removesuffix('...').strip()}")
    if text:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"run_config key 'config-yaml' is not valid YAML: {exc}") from exc
        if data is None:
            data = {}
        if not isinstance(data, dict):
            raise ConfigError(f"run_config key 'config-yaml' must hold a YAML mapping, got {type(data).__name__}")
        return config_from_dict(apply_overrides(data, overrides), source="run_config 'config-yaml'"), options
    if path:
        candidate = Path(path)
        if not candidate.is_absolute():
            for base in (*base_dirs, Path.cwd()):
                if (base / candidate).is_file():
                    candidate = base / candidate
                    break
        return load_config(candidate, overrides), options
    return config_from_dict(apply_overrides({}, overrides), source="run_config"), options


def run_config_for(cfg: Config, options: RunOptions | None = None) -> dict[str, Any]:
    """The ``run_config`` mapping that makes :func:`config_from_run_config` return ``cfg``.

    Used by launchers that pass a config to ``flwr run`` (``--run-config`` with a TOML file).
    """
    options = options or RunOptions()
    return {
        "config-yaml": yaml.safe_dump(to_dict(cfg), sort_keys=False),
        "config-file": "",
        "overrides": "",
        "out-dir": options.out_dir,
        "resume": options.resume,
    }
