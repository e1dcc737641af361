"""The aggregation-rule interface and its registry: one rule per module, selected by ``federation.aggregation``.

A rule is an object built from its own options (:meth:`Aggregator.from_config`), which it validates
itself (:meth:`Aggregator.check_config`), and that combines a round's ``C`` stacked client updates
given their weights and the current model. Adding a rule is one module that registers itself::

    @AGGREGATORS.register("krum")
    class Krum(Aggregator): ...

plus its import in ``fedmeta/aggregation/__init__.py`` and its test.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Self

import torch

from fedmeta.registry import Registry
from fedmeta.types import Params

if TYPE_CHECKING:
    from fedmeta.config import Config

__all__ = [
    "Aggregator",
    "OptionRule",
    "AGGREGATORS",
    "build_aggregator",
    "aggregate",
    "normalized_weights",
    "weighted_sum",
    "flat_updates",
]


class Aggregator(ABC):
    """One rule that combines ``C`` client updates into one.

    Built once per run from the rule's own options; :meth:`aggregate` is then called every round.
    """

    @classmethod
    def from_config(cls, cfg: Config) -> Aggregator:
        """Build the rule from its options (``federation.<option>`` keys; none by default).

        Raises:
            ConfigError: if an option is out of range (naming its key).
        """
        return cls()

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """Validate the options this rule owns (none by default).

        Config validation calls it for every registered rule on every config, whichever rule the
        config selects, so that a config never carries an invalid value (as before rules had
        modules of their own); a rule with rules that apply only when it is selected tests
        ``cfg.federation.aggregation`` itself.

        Raises:
            ConfigError: naming the key and the bad value.
        """

    @abstractmethod
    def aggregate(self, updates: Params, weights: torch.Tensor, *, reference: Params | None = None) -> Params:
        """Combine stacked client updates into one.

        Args:
            updates: ``{key: [C, *shape]}``, one row per client.
            weights: ``[C]`` non-negative weights (the number of tasks behind each update, capped by
                the round loop at ``meta.tasks_per_client × meta.local_steps``; ones under DP).
            reference: the current model ``{key: [*shape]}`` the updates were computed at, for rules
                that compare updates with it; ``None`` when the caller has none to give (the rules
                of today do not use it; a rule that needs it raises ``ValueError`` on ``None``).

        Returns:
            ``{key: [*shape]}``.

        Raises:
            ValueError: if the weights or the updates do not allow the rule (e.g. weights summing to zero).
        """


class OptionRule(Aggregator):
    """A rule with one option, ``federation.<option>``: built from it and validated by :meth:`check_option`.

    A subclass names the option (:attr:`option`), says what a valid value is (:meth:`check_option`,
    which the constructor, :meth:`from_config` and :meth:`check_config` all use), and keeps the value
    under its own name.

    Args:
        value: the option's value.

    Raises:
        ConfigError: naming ``federation.<option>`` if the value is not valid.
    """

    #: the ``federation`` key of the rule's option
    option: ClassVar[str]

    def __init__(self, value: Any, /) -> None:
        self.check_option(value)

    @classmethod
    @abstractmethod
    def check_option(cls, value: Any) -> None:
        """Refuse an invalid value of the option.

        Raises:
            ConfigError: naming ``federation.<option>`` and the value.
        """

    @classmethod
    def from_config(cls, cfg: Config) -> Self:
        """From ``federation.<option>``."""
        return cls(getattr(cfg.federation, cls.option))

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        """``federation.<option>`` valid (checked whichever rule is selected)."""
        cls.check_option(getattr(cfg.federation, cls.option))


def normalized_weights(weights: torch.Tensor, *, whose: str = "") -> torch.Tensor:
    """The weights divided by their sum, in float64.

    Args:
        weights: ``[C]`` non-negative weights.
        whose: words after "aggregation weights" in the error (which weights they are).

    Returns:
        ``[C]`` float64 weights summing to one.

    Raises:
        ValueError: if the weights sum to zero.
    """
    w = weights.to(torch.float64)
    if float(w.sum()) <= 0:
        raise ValueError(f"aggregation weights{whose} sum to zero")
    return w / w.sum()


def weighted_sum(updates: Params, coef: torch.Tensor) -> Params:
    """``sum_c coef_c u_c`` of stacked updates ``{key: [C, *shape]}`` (``coef`` cast to each key's dtype)."""
    return {k: torch.tensordot(coef.to(v.dtype), v, dims=1) for k, v in updates.items()}


def flat_updates(updates: Params) -> torch.Tensor:
    """``[C, D]`` float64: each client's update, all keys concatenated in order."""
    return torch.cat([v.reshape(v.shape[0], -1).to(torch.float64) for v in updates.values()], dim=1)


#: The aggregation rules, by their ``federation.aggregation`` name (filled by the rule modules).
AGGREGATORS = Registry[type[Aggregator]]("aggregator", key="federation.aggregation")


def build_aggregator(cfg: Config) -> Aggregator:
    """The rule ``cfg.federation.aggregation`` names, built from its options.

    Raises:
        ConfigError: for an unknown name (naming ``federation.aggregation`` and the known names) or
            an invalid option of the rule.
    """
    if cfg.meta.trlearner.federated != "off":  # TRLearner's federated variant replaces the mean
        from fedmeta.aggregation.relations import RelationWeighted

        return RelationWeighted.from_config(cfg)
    return AGGREGATORS.get(cfg.federation.aggregation).from_config(cfg)


def aggregate(
    stacked: Params,
    weights: torch.Tensor,
    *,
    method: str = "mean",
    trim_fraction: float = 0.1,
    **options: Any,
) -> Params:
    """Combine ``C`` stacked client updates into one with the rule named ``method``.

    The functional form of :func:`build_aggregator` + :meth:`Aggregator.aggregate` (no reference model).

    Args:
        stacked: ``{key: [C, *shape]}``.
        weights: ``[C]`` non-negative weights (number of tasks per client) for the rules that use them.
        method: a registered rule: ``"mean"`` (weighted mean), ``"median"`` (coordinate-wise median;
            bounds the influence of a minority of arbitrary updates), ``"trimmed_mean"``
            (coordinate-wise, dropping the ``trim_fraction`` largest and smallest values; Yin et al., 2018),
            their weighted forms ``"weighted_median"`` / ``"weighted_trimmed_mean"``, ``"krum"`` /
            ``"multikrum"`` (Blanchard et al., 2017) or ``"norm_bound"`` (Sun et al., 2019).
        trim_fraction: share trimmed at each end for ``trimmed_mean`` / ``weighted_trimmed_mean``.
        options: other ``federation`` options of the rule (``krum_f``, ``multikrum_m``, ``norm_bound``).

    Returns:
        ``{key: [*shape]}``.

    Raises:
        ValueError: for an unknown ``method``, or weights summing to zero under a weighted rule.
        ConfigError: for an option out of range (naming its key).
    """
    from fedmeta.config import Config, FederationConfig  # light (no torch); config imports this package lazily

    if method not in AGGREGATORS:
        raise ValueError(f"aggregation method must be one of {AGGREGATORS.names()}, got {method!r}")
    cfg = Config(federation=FederationConfig(aggregation=method, trim_fraction=trim_fraction, **options))
    return build_aggregator(cfg).aggregate(stacked, weights)
