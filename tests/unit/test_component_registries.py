"""The model, task-family and aggregator registries: the names config accepts, and who validates what."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import replace

import pytest

import fedmeta.config as config_module
from fedmeta.aggregation import AGGREGATORS, build_aggregator
from fedmeta.config import REGRESSION_TASKS, Config, config_from_dict
from fedmeta.errors import ConfigError
from fedmeta.models import MODELS, Conv4, build_model
from fedmeta.tasks import TASK_FAMILIES, build_family
from fedmeta.tasks.glyphs import GlyphFamily
from fedmeta.tasks.regression import HarmonicFamily


def _task(name: str) -> dict[str, object]:
    if name == "hf":
        return {"name": name, "hf": {"path": "/nonexistent/dataset"}}
    return {"name": name, "data_dir": "/nonexistent/site"} if name == "folder" else {"name": name}


def test_names_in_the_order_messages_list_them() -> None:
    assert TASK_FAMILIES.names() == ("sinusoid", "harmonic", "glyphs", "folder", "omniglot", "femnist", "hf")
    assert MODELS.names() == ("mlp", "conv4")
    assert AGGREGATORS.names() == (
        "mean", "median", "trimmed_mean", "weighted_median", "weighted_trimmed_mean", "krum", "multikrum", "norm_bound",
    )
    assert TASK_FAMILIES.names() == config_module.TASK_NAMES
    assert MODELS.names() == config_module.MODEL_NAMES
    assert all(TASK_FAMILIES.get(n).name == n for n in TASK_FAMILIES) and all(MODELS.get(n).name == n for n in MODELS)


def test_regression_tasks_are_registered_regression_families() -> None:
    # config still lists them for the meta.head_init rule; they must be names the registry holds
    assert REGRESSION_TASKS
    assert all(n in TASK_FAMILIES and TASK_FAMILIES.get(n).kind == "regression" for n in REGRESSION_TASKS)


@pytest.mark.parametrize("family", TASK_FAMILIES.names())
def test_every_family_is_accepted_with_the_models_it_fits(family: str) -> None:
    fits = TASK_FAMILIES.get(family).models or MODELS.names()
    for model in fits:
        cfg = config_from_dict({"task": _task(family), "model": {"name": model}})
        assert (cfg.task.name, cfg.model.name) == (family, model)
    for model in set(MODELS.names()) - set(fits):
        match = rf"config key 'model.name' must be '{fits[0]}' for task.name '{family}', got '{model}'"
        with pytest.raises(ConfigError, match=match):
            config_from_dict({"task": _task(family), "model": {"name": model}})


@pytest.mark.parametrize("rule", AGGREGATORS.names())
def test_every_aggregator_is_accepted_and_built(rule: str) -> None:
    cfg = config_from_dict({"federation": {"aggregation": rule}})
    assert isinstance(build_aggregator(cfg), AGGREGATORS.get(rule))


@pytest.mark.parametrize(
    ("section", "key", "names"),
    [
        ("task", "name", TASK_FAMILIES.names()),
        ("model", "name", MODELS.names()),
        ("federation", "aggregation", AGGREGATORS.names()),
    ],
)
def test_unknown_names_in_config_name_the_key_and_known_names(section: str, key: str, names: tuple[str, ...]) -> None:
    match = rf"config key '{section}.{key}' must be one of {', '.join(names)}, got 'nope'"
    with pytest.raises(ConfigError, match=match):
        config_from_dict({section: {key: "nope"}})


def test_builders_refuse_unknown_names_naming_the_key() -> None:
    cfg = Config()
    known = (
        r"config key 'task.name' has no task family 'nope' "
        r"\(known: sinusoid, harmonic, glyphs, folder, omniglot, femnist, hf\)"
    )
    with pytest.raises(ConfigError, match=known):
        build_family(replace(cfg, task=replace(cfg.task, name="nope")))
    with pytest.raises(ConfigError, match=r"config key 'model.name' has no model 'nope' \(known: mlp, conv4\)"):
        build_model(replace(cfg, model=replace(cfg.model, name="nope")), (1,), 1)
    known = (
        r"config key 'federation.aggregation' has no aggregator 'nope' \(known: mean, median, trimmed_mean, "
        r"weighted_median, weighted_trimmed_mean, krum, multikrum, norm_bound\)"
    )
    with pytest.raises(ConfigError, match=known):
        build_aggregator(replace(cfg, federation=replace(cfg.federation, aggregation="nope")))


def test_components_check_their_own_options() -> None:
    cfg = Config()
    with pytest.raises(ConfigError, match=r"'task.partition' must be one of iid, style, script, dirichlet, got 'wri'"):
        GlyphFamily.check_config(replace(cfg, task=replace(cfg.task, partition="wri")))
    with pytest.raises(ConfigError, match=r"'task.damping' must stay below 1 \(underdamped\), got \[0.1, 1.0\]"):
        HarmonicFamily.check_config(replace(cfg, task=replace(cfg.task, damping=(0.1, 1.0))))
    with pytest.raises(ConfigError, match=r"'model.channels' must be a multiple of 8 for model.norm 'group'"):
        Conv4.check_config(replace(cfg, model=replace(cfg.model, name="conv4", norm="group", channels=12)))
    Conv4.check_config(replace(cfg, model=replace(cfg.model, name="mlp", norm="group", channels=12)))  # not selected


def test_options_of_unselected_components_are_still_checked() -> None:
    # as before the rules moved into the components: a config never carries an invalid value
    with pytest.raises(ConfigError, match="task.partition"):
        config_from_dict({"task": {"name": "sinusoid", "partition": "writer"}})
    with pytest.raises(ConfigError, match="model.norm"):
        config_from_dict({"model": {"name": "mlp", "norm": "instance"}})


def test_importing_config_does_not_import_torch() -> None:
    code = "import sys, fedmeta.config; assert 'torch' not in sys.modules, 'fedmeta.config imported torch'"
    subprocess.run([sys.executable, "-c", code], check=True)
