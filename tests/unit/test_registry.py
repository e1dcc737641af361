"""The component registry: names in order, duplicates refused, unknown names a ConfigError naming the key."""

import pytest

from fedmeta.errors import ConfigError
from fedmeta.registry import Registry


def test_registers_in_order_and_looks_up():
    reg = Registry[type]("widget", key="section.widget")

    @reg.register("b")
    class B: ...

    reg.add("a", int)
    assert reg.names() == ("b", "a")
    assert reg.get("b") is B and reg.get("a") is int
    assert "a" in reg and "c" not in reg and len(reg) == 2 and list(reg) == ["b", "a"]


def test_unknown_name_names_key_value_and_known_names():
    reg = Registry[int]("widget", key="section.widget")
    reg.add("one", 1)
    with pytest.raises(ConfigError, match=r"'section.widget' has no widget 'two' \(known: one\)"):
        reg.get("two")


def test_duplicate_and_blank_names_refused():
    reg = Registry[int]("widget", key="k")
    reg.add("one", 1)
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("one", 2)
    with pytest.raises(ValueError, match="non-empty"):
        reg.add(" ", 3)
