"""Registries: the one place each kind of component (algorithms, models, task families, privacy
mechanisms, aggregators) is named.

A component registers itself where it is defined::

    AGGREGATORS = Registry[Aggregator]("aggregator", key="federation.aggregation")

    @AGGREGATORS.register("median")
    class CoordinateMedian: ...

and everything else (config validation, the CLI's listings, error messages) asks the registry for
the names, so a new component is one module and its test. ``key`` is the config key that selects
from the registry; unknown names raise a :class:`~fedmeta.errors.ConfigError` naming that key,
the bad value and the known names. :func:`require` is the one way components (and config) refuse an
option value, so every such message reads ``config key '<key>' <why>, got <value>``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from fedmeta.errors import ConfigError

__all__ = ["Registry", "require"]

T = TypeVar("T")


class Registry(Generic[T]):
    """Names to components of one kind, in registration order.

    Args:
        kind: what the components are, for messages (``"algorithm"``).
        key: the config key whose value is looked up here (``"meta.algorithm"``).
    """

    def __init__(self, kind: str, *, key: str) -> None:
        self.kind = kind
        self.key = key
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator registering ``entry`` under ``name``.

        Raises:
            ValueError: if ``name`` is taken (two components must not share a config name).
        """

        def add(entry: T) -> T:
            self.add(name, entry)
            return entry

        return add

    def add(self, name: str, entry: T) -> None:
        """Register ``entry`` under ``name`` (see :meth:`register`)."""
        if not name or name != name.strip():
            raise ValueError(f"{self.kind} name {name!r} must be a non-empty word")
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry

    def get(self, name: str) -> T:
        """The component registered under ``name``.

        Raises:
            ConfigError: naming :attr:`key`, the value and the known names.
        """
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise ConfigError(
                f"config key '{self.key}' has no {self.kind} {name!r} (known: {', '.join(self._entries)})"
            ) from None

    def names(self) -> tuple[str, ...]:
        """The registered names, in registration order."""
        return tuple(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> list[tuple[str, T]]:
        """``(name, component)`` pairs in registration order."""
        return list(self._entries.items())


def require(cond: bool, key: str, value: object, why: str) -> None:
    """Refuse a config value: the one message format of a bad option, for config and components alike.

    Args:
        cond: what must hold.
        key: the dotted config key (``"federation.trim_fraction"``).
        value: the offending value, quoted with ``repr`` in the message.
        why: what the value must be (``"must be in [0, 0.5)"``).

    Raises:
        ConfigError: ``config key '<key>' <why>, got <value>`` when ``cond`` is false.
    """
    if not cond:
        raise ConfigError(f"config key '{key}' {why}, got {value!r}")
