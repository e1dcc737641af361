"""Fuzzing config parsing (hypothesis): every file and override gets a ConfigError or a Config, never a traceback.

Inputs are random YAML text, random values under the real keys (so that validation, not only
the key lookup, is exercised) and random ``--set`` overrides. Derandomized and bounded: the same
examples in every run, a few seconds in all.
"""

from __future__ import annotations

import dataclasses
import math
import tempfile
import types
import typing
from pathlib import Path
from typing import Any

import yaml
from hypothesis import given
from hypothesis import strategies as st

from fedmeta.config import Config, from_flat, load_config, to_flat
from fedmeta.errors import ConfigError
from tests.unit.fuzzing import fuzz_settings

FUZZ = fuzz_settings(60)

#: every section and its keys, as the dataclasses declare them
SECTIONS = {
    f.name: [g.name for g in dataclasses.fields(typing.get_type_hints(Config)[f.name])]
    for f in dataclasses.fields(Config)
    if dataclasses.is_dataclass(typing.get_type_hints(Config)[f.name])
}
TOP = [f.name for f in dataclasses.fields(Config) if f.name not in SECTIONS]
DOTTED = [*TOP, *(f"{s}.{k}" for s, keys in SECTIONS.items() for k in keys)]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from([0, 1, -1, 2, 3, 5, 10, 100, 0.5, 1e-5, 1e300]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["none", "task", "client-central", "client-local", "poisson", "uniform", "maml", "anil", "step"]),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=6,
)


HINTS = {
    **{k: typing.get_type_hints(Config)[k] for k in TOP},
    **{
        f"{s}.{k}": typing.get_type_hints(typing.get_type_hints(Config)[s])[k]
        for s, keys in SECTIONS.items()
        for k in keys
    },
}
NAMES = st.sampled_from(
    [
        "none",
        "task",
        "client-central",
        "client-local",
        "poisson",
        "uniform",
        "maml",
        "fomaml",
        "metasgd",
        "anil",
        "protonet",
        "reptile",
        "sinusoid",
        "harmonic",
        "folder",
        "glyphs",
        "mlp",
        "conv4",
        "mean",
        "median",
        "trimmed_mean",
        "step",
        "cosine",
        "linear",
        "constant",
        "adam",
        "sgd",
        "rdp",
        "prv",
        "gdp",
        "iid",
        "prototypes",
    ]
)


def typed(tp: Any) -> st.SearchStrategy[Any]:
    """Values of the key's own type (so that validation, not the type check, decides), extremes included."""
    origin = typing.get_origin(tp)
    if origin in (types.UnionType, typing.Union):
        return st.one_of(*(st.none() if a is type(None) else typed(a) for a in typing.get_args(tp)))
    if origin is tuple:
        args = typing.get_args(tp)
        inner = typed(args[0]) if args else values
        if len(args) == 2 and args[1] is Ellipsis:
            return st.lists(inner, max_size=4)
        return st.tuples(*(typed(a) for a in args)).map(list)
    if tp is bool:
        return st.booleans()
    if tp is int:
        return st.one_of(st.integers(-3, 40), st.sampled_from([0, 1, 10**6, 2**31, 2**63, -(2**63)]))
    if tp is float:
        return st.one_of(
            st.floats(-10, 10),
            st.sampled_from([0.0, 1.0, 0.5, 1e-12, 1e300, -1e300, math.inf, -math.inf]),
            st.integers(-3, 3),
        )
    if tp is str:
        return st.one_of(NAMES, st.text(max_size=8))
    return values


@st.composite
def config_mappings(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}

    def value(key: str) -> Any:
        # mostly of the key's type; sometimes anything (the type check's turn)
        return draw(values) if draw(st.integers(0, 29)) == 0 else draw(typed(HINTS[key]))

    for key in draw(st.lists(st.sampled_from(TOP), max_size=2, unique=True)):
        data[key] = value(key)
    for section in draw(st.lists(st.sampled_from(sorted(SECTIONS)), max_size=5, unique=True)):
        if draw(st.integers(0, 19)) == 0:
            data[section] = draw(values)  # a section that is not a mapping
            continue
        keys = draw(st.lists(st.sampled_from(SECTIONS[section]), max_size=6, unique=True))
        data[section] = {k: value(f"{section}.{k}") for k in keys}
    if draw(st.integers(0, 9)) == 0:
        data[draw(st.text(max_size=6))] = draw(values)  # an unknown key, maybe
    return data


def _load(text: str, overrides: list[str] | None = None) -> Config | None:
    """load_config of ``text``; ``None`` when it is refused with a ConfigError (any other error fails the test)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "run.yaml"
        path.write_text(text, encoding="utf-8")
        try:
            return load_config(path, overrides)
        except ConfigError as exc:
            assert "Traceback" not in str(exc)
            return None


@FUZZ
@given(st.text(max_size=200))
def test_random_text_is_a_config_or_a_config_error(text: str) -> None:
    _load(text)


@FUZZ
@given(config_mappings())
def test_random_values_under_the_real_keys_are_a_config_or_a_config_error(data: dict[str, Any]) -> None:
    cfg = _load(yaml.safe_dump(data, allow_unicode=True))
    if cfg is not None:
        # what is accepted survives the trip through Flower's run_config unchanged
        assert from_flat(to_flat(cfg)) == cfg


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.builds(lambda k, v: f"{k}={v}", st.sampled_from(DOTTED), st.text(max_size=10)),
            st.builds(
                lambda k, v: f"{k}={yaml.safe_dump(v, default_flow_style=True).strip()}",
                st.sampled_from(DOTTED),
                values,
            ),
            st.text(max_size=20),
        ),
        max_size=4,
    )
)
def test_random_overrides_are_a_config_or_a_config_error(overrides: list[str]) -> None:
    _load("seed: 0\n", overrides)
