"""The privacy mechanisms (issue 14): one class per mode, their declarations, and no mode switches elsewhere."""

from __future__ import annotations

import ast
import dataclasses
import inspect
import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from fedmeta.aggregation import AGGREGATORS
from fedmeta.config import PRIVACY_MODES, Config, config_from_dict
from fedmeta.errors import ConfigError
from fedmeta.privacy import MODES, ClientPrivacy, ServerPrivacy, describe_mode
from fedmeta.privacy.mechanisms import (
    MECHANISMS,
    NOISE_ADDERS,
    UNITS,
    ClientCentralPrivacy,
    ClientDistributedPrivacy,
    ClientLocalPrivacy,
    NoPrivacy,
    PrivacyMechanism,
    TaskPrivacy,
    declarations_table,
    mechanism_for,
)

ROOT = Path(__file__).resolve().parents[3]
MECHANISMS_DIR = ROOT / "fedmeta" / "privacy" / "mechanisms"


def _cfg(mode: str, **privacy: object) -> Config:
    return config_from_dict(
        {
            "task": {"name": "sinusoid", "tasks_per_site": 20},
            "federation": {"clients_total": 10, "clients_per_round": 4, "rounds": 3,
                           "sampling": "poisson" if mode == "client-central" else "uniform"},
            "privacy": {"mode": mode, "noise_seed": 1, **privacy},
        }
    )  # fmt: skip


# -- the registry and the declarations --------------------------------------------------------


def test_one_registered_class_per_mode_in_message_order() -> None:
    assert MECHANISMS.names() == ("none", "client-central", "client-local", "task", "client-distributed")
    assert MECHANISMS.names() == PRIVACY_MODES
    assert [MECHANISMS.get(n) for n in MECHANISMS] == [
        NoPrivacy, ClientCentralPrivacy, ClientLocalPrivacy, TaskPrivacy, ClientDistributedPrivacy
    ]
    for name, mech in MECHANISMS.items():
        assert issubclass(mech, PrivacyMechanism) and mech.name == name
        assert inspect.getmodule(mech).__name__.startswith("fedmeta.privacy.mechanisms.")


@pytest.mark.parametrize(
    ("mode", "unit", "noise_by", "enabled"),
    [
        ("none", "none", "nobody", False),
        ("client-central", "client", "server", True),
        ("client-local", "client", "client", True),
        ("task", "task", "site", True),
        ("client-distributed", "client", "clients", True),
    ],
)
def test_each_mode_declares_its_unit_and_who_adds_the_noise(mode: str, unit: str, noise_by: str, enabled: bool) -> None:
    mech = mechanism_for(mode)
    assert (mech.unit, mech.noise_added_by, mech.enabled) == (unit, noise_by, enabled)
    assert mech.unit in UNITS and mech.noise_added_by in NOISE_ADDERS
    assert describe_mode(mode) is mech.description and MODES[mode] == mech.description
    assert mech.description.name == mode


def test_what_leaves_a_site_is_one_sentence_of_the_class_docstring() -> None:
    for name, mech in MECHANISMS.items():
        doc = " ".join((mech.__doc__ or "").split())
        assert mech.leaves_site and "." not in mech.leaves_site, name
        assert f"What leaves a site: {mech.leaves_site}." in doc, name


def test_docs_table_matches_the_declarations() -> None:
    text = (ROOT / "docs" / "privacy.md").read_text(encoding="utf-8")
    assert declarations_table() in text


def test_unknown_mode_names_the_key_and_the_known_modes() -> None:
    with pytest.raises(
        ConfigError, match=r"config key 'privacy.mode' has no mode 'central' \(known: none, client-central"
    ):
        mechanism_for("central")


# -- compatibility ----------------------------------------------------------------------------


def test_declared_aggregations_are_registered_rules() -> None:
    for name in MECHANISMS:
        mech = MECHANISMS.get(name)
        if mech.aggregations is not None:
            assert set(mech.aggregations) <= set(AGGREGATORS.names())
    central = mechanism_for("client-central")
    assert central.needs_poisson_sampling and central.accepts_aggregation("mean")
    assert not central.accepts_aggregation("median")
    assert all(mechanism_for(m).accepts_aggregation(r) for m in ("none", "client-local", "task") for r in AGGREGATORS)
    assert not any(mechanism_for(m).needs_poisson_sampling for m in ("none", "client-local", "task"))


@dataclass(frozen=True)
class FakeTerm:
    """An objective term as the engine declares one: a name and whether it is a sum over tasks."""

    name: str
    separable_per_task: bool


def test_task_level_dp_refuses_a_non_separable_objective_term_by_name() -> None:
    terms = [FakeTerm("l2", True), FakeTerm("cross_task_alignment", False)]
    with pytest.raises(
        ConfigError, match=r"'cross_task_alignment' couples the tasks of a meta-batch: privacy.mode 'task'"
    ):
        mechanism_for("task").check_objective_terms(terms)
    mechanism_for("task").check_objective_terms([FakeTerm("l2", True)])
    for mode in ("none", "client-central", "client-local"):
        mechanism_for(mode).check_objective_terms(terms)  # client-level DP clips the whole update


def test_mode_rules_are_the_mechanisms_own() -> None:
    cfg = _cfg("client-central")
    median = dataclasses.replace(cfg, federation=dataclasses.replace(cfg.federation, aggregation="median"))
    with pytest.raises(ConfigError, match=r"'federation.aggregation' must be 'mean' for privacy.mode 'client-central'"):
        ClientCentralPrivacy().check_config(median)
    TaskPrivacy().check_config(median)  # post-processing of already private updates: any rule
    with pytest.raises(
        ConfigError, match=r"'privacy.adaptive_clipping' applies to privacy.mode client-central or client-local"
    ):
        _cfg("task", adaptive_clipping=True)
    # the clipped-count noise default is the mechanism's: the noise multiplier under local DP
    local = _cfg("client-local", adaptive_clipping=True, noise_multiplier=1.0)
    central = _cfg("client-central", adaptive_clipping=True, noise_multiplier=0.1)
    assert local.privacy.count_stddev(4) == 1.0 and central.privacy.count_stddev(4) == 4 / 20


def test_client_central_with_the_default_sampling_takes_poisson_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="fedmeta.privacy.mechanisms.base"):
        cfg = config_from_dict({"privacy": {"mode": "client-central"}})
    assert cfg.federation.sampling == "poisson"
    assert "federation.sampling, not set in the config, is 'poisson'" in caplog.text
    # an explicit choice is the user's: refused, not overridden
    with pytest.raises(ConfigError, match=r"'federation.sampling' must be 'poisson' for privacy.mode 'client-central'"):
        config_from_dict({"privacy": {"mode": "client-central"}, "federation": {"sampling": "uniform"}})
    # modes that do not declare Poisson sampling keep the default, and nothing is logged for them
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fedmeta.privacy.mechanisms.base"):
        assert config_from_dict({"privacy": {"mode": "client-local"}}).federation.sampling == "uniform"
    assert "poisson" not in caplog.text


# -- the facades ask the mechanism -----------------------------------------------------------------


@pytest.mark.parametrize("mode", ["none", "client-central", "client-local", "task"])
def test_facades_delegate_to_the_mode_mechanism(mode: str) -> None:
    cfg = _cfg(mode)
    server, client = ServerPrivacy(cfg), ClientPrivacy(cfg, 0)
    assert type(server.mechanism) is MECHANISMS.get(mode) and type(client.mechanism) is MECHANISMS.get(mode)
    assert (server.accountant is not None) == (mode == "client-central")
    assert (client.accountant is not None or client.site is not None) == client.mechanism.client_keeps_state
    assert server.state_dict()["mode"] == mode


# -- no mode switches outside fedmeta/privacy/mechanisms/ -----------------------------------------


def _names_in(node: ast.AST) -> set[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return {node.value}
    if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
        return {e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return set()


def _about_a_mode(node: ast.AST) -> bool:
    # ``cfg.privacy.mode``, ``mode``, ``plan.mode``, ``report["mode"]``: anything naming a mode
    return "mode" in ast.unparse(node).lower()


def mode_comparisons(source: str, filename: str = "<source>") -> list[int]:
    """Lines of ``source`` that compare a privacy mode with a mode's name (``==``, ``!=``, ``in``, ``match``).

    A comparison counts when one side is a mode name (or a tuple of them) and either another side
    names a mode (``p.mode``, ``mode``, ``report["mode"]``) or the names include one no other
    setting uses (``client-central``, ``client-local``): ``norm == "none"`` is not a mode check.
    Code only: docstrings, comments and messages that merely mention a mode are not comparisons.
    """
    modes = set(MECHANISMS.names())
    distinct = {m for m in modes if m.startswith("client-")}
    lines = []
    for node in ast.walk(ast.parse(source, filename=filename)):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.Match):
            operands = [node.subject] + [c.pattern.value for c in node.cases if isinstance(c.pattern, ast.MatchValue)]
        else:
            continue
        named = set().union(*(_names_in(o) for o in operands)) & modes
        if named and (named & distinct or any(_about_a_mode(o) for o in operands if not _names_in(o))):
            lines.append(node.lineno)
    return sorted(lines)


def test_the_check_finds_a_mode_comparison() -> None:
    bad = (
        '"""privacy.mode == \'task\' in a docstring is fine."""\n'
        "# if cfg.privacy.mode == 'task': a comment is fine\n"
        "x = cfg.privacy.mode == 'client-local'\n"
        "y = mode in ('client-local', 'task')\n"
        "z = 'none' != p.mode\n"
        "msg = f\"privacy.mode '{p.mode}'\"\n"
        "w = report['mode'] == 'none'\n"
        "v = norm == 'none' or kind == 'task'\n"
        "match plan.mode:\n    case 'task':\n        pass\n"
    )
    assert mode_comparisons(bad) == [3, 4, 5, 7, 9]


def test_no_mode_comparisons_outside_the_mechanisms() -> None:
    found = []
    for top in ("fedmeta", "client", "server"):
        for path in sorted((ROOT / top).rglob("*.py")):
            if MECHANISMS_DIR in path.parents:
                continue
            rel = path.relative_to(ROOT).as_posix()
            found += [f"{rel}:{line}" for line in mode_comparisons(path.read_text(encoding="utf-8"), rel)]
    assert found == []
