"""Config loading, overrides and the errors bad input gets (SPEC §6, §10)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fedmeta.config import Config, apply_overrides, config_from_dict, from_flat, load_config, to_dict, to_flat
from fedmeta.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


SHIPPED = sorted(p.name for p in (Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


def test_the_shipped_configs_are_found() -> None:
    assert {"sinusoid.yaml", "harmonic.yaml", "glyphs.yaml", "glyphs-anil.yaml", "sinusoid-dp.yaml"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_load(repo_root: Path, name: str) -> None:
    cfg = load_config(repo_root / "configs" / name)
    assert isinstance(cfg, Config)
    if name == "glyphs-anil.yaml":
        # the recipe the comment describes: a way-agnostic head trained on 40-way episodes
        assert (cfg.meta.algorithm, cfg.meta.head_init, cfg.task.ways) == ("anil", "prototypes", 40)
        assert cfg.federation.clients_per_round * cfg.meta.tasks_per_client == 8


def test_spec_keys_have_spec_defaults() -> None:
    cfg = Config()
    assert (cfg.task.name, cfg.task.shots, cfg.task.query, cfg.task.ways) == ("sinusoid", 10, 10, 5)
    assert (cfg.meta.algorithm, cfg.meta.inner_lr, cfg.meta.inner_steps) == ("maml", 0.01, 1)
    assert (cfg.meta.outer_optimizer, cfg.meta.outer_lr, cfg.meta.tasks_per_client) == ("adam", 0.001, 1)
    assert (cfg.federation.clients_total, cfg.federation.clients_per_round, cfg.federation.rounds) == (100, 25, 1000)
    assert (cfg.privacy.mode, cfg.privacy.clip_norm, cfg.privacy.noise_multiplier) == ("none", 1.0, 1.0)
    assert (cfg.privacy.delta, cfg.privacy.target_epsilon, cfg.privacy.accountant) == (1e-5, None, "rdp")
    assert (cfg.eval.tasks, cfg.eval.steps, cfg.eval.every) == (600, 10, 100)


def test_overrides_apply_by_dotted_path(tmp_path: Path) -> None:
    p = _write(tmp_path, "seed: 3\nmeta:\n  inner_lr: 0.02\n")
    cfg = load_config(
        p,
        [
            "meta.algorithm=fomaml",
            "privacy.noise_multiplier=1.1",
            "task.amplitude=[1, 2]",
            "privacy.target_epsilon=null",
        ],
    )
    assert cfg.seed == 3 and cfg.meta.inner_lr == 0.02 and cfg.meta.algorithm == "fomaml"
    assert cfg.privacy.noise_multiplier == 1.1 and cfg.task.amplitude == (1.0, 2.0)


def test_scientific_notation_without_dot_is_a_number(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "privacy:\n  delta: 1e-5\n"))
    assert cfg.privacy.delta == 1e-5


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("meta:\n  inner_lrr: 0.1\n", r"unknown config key 'meta.inner_lrr'"),
        ("bogus: 1\n", r"unknown config key 'bogus'"),
        ("meta:\n  inner_lr: -0.1\n", r"'meta.inner_lr'.*-0.1"),
        ("meta:\n  inner_lr: fast\n", r"'meta.inner_lr' must be a number.*'fast'"),
        ("meta:\n  algorithm: mamll\n", r"'meta.algorithm'.*mamll"),
        ("meta:\n  algorithm: anil\n  head_init: random\n", r"'meta.head_init'.*random"),
        (
            "meta:\n  algorithm: maml\n  head_init: prototypes\n",
            r"'meta.head_init' must be 'learned' unless meta.algorithm is 'anil'.*got 'prototypes'",
        ),
        (
            "task:\n  name: sinusoid\nmeta:\n  algorithm: anil\n  head_init: prototypes\n",
            r"'meta.head_init' must not be 'prototypes'.*regression.*'sinusoid'",
        ),
        ("federation:\n  clients_per_round: 200\n", r"'federation.clients_per_round'.*200"),
        ("federation:\n  rounds: 0\n", r"'federation.rounds'.*0"),
        ("task:\n  shots: 2.5\n", r"'task.shots' must be an integer.*2.5"),
        ("task:\n  amplitude: [5, 1]\n", r"'task.amplitude'"),
        ("privacy:\n  noise_multiplier: -1\n", r"'privacy.noise_multiplier'.*-1"),
        ("privacy:\n  clip_norm: 0\n", r"'privacy.clip_norm'.*0"),
        ("privacy:\n  delta: 1.0\n", r"'privacy.delta'.*1.0"),
        ("privacy:\n  mode: central\n", r"'privacy.mode'.*central"),
        ("eval:\n  steps: 0\n", r"'eval.steps'"),
        ("meta: 5\n", r"section 'meta' must be a mapping"),
        ("- a\n- b\n", r"must hold a YAML mapping"),
        ("task:\n  name: folder\n", r"'task.data_dir'"),
        ("task:\n  name: sinusoid\nmodel:\n  name: conv4\n", r"'model.name'.*conv4"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(_write(tmp_path, text))


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = _write(tmp_path, "seed: 0\nmeta:\n  inner_lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"cfg.yaml' is not valid YAML at line \d+"):
        load_config(p)


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="nope.yaml' does not exist"):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("meta.inner_lrr=0.1", r"unknown config key 'meta.inner_lrr'"),
        ("meta=1", r"names a section"),
        ("noequals", r"expects dotted.key=value"),
        ("seed.x=1", r"'seed' is not a section"),
    ],
)
def test_bad_overrides_name_the_key(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        apply_overrides({}, [override])


def test_flat_round_trip_is_exact() -> None:
    cfg = config_from_dict({"seed": 4, "task": {"amplitude": [0.5, 2.0]}, "model": {"hidden": [8, 8]}})
    flat = to_flat(cfg)
    assert all(isinstance(v, (str, int, float, bool)) for v in flat.values())
    assert from_flat(flat) == cfg
    assert to_dict(from_flat(flat)) == to_dict(cfg)
