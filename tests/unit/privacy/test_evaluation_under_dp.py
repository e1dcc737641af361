"""Evaluation under DP releases nothing un-noised from a site (issue 15, finding 4).

Federated evaluation sends each site's held-out means without noise, so every DP mode refuses it;
``fedmeta deploy-local`` does not turn it on under DP; and over site folders the server evaluates
on held-out sites that no client reads (``eval.data_dir``), never on the clients' own ``heldout/``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmeta.config import Config, config_from_dict
from fedmeta.datagen import make_sites
from fedmeta.errors import ConfigError
from fedmeta.experiment import Experiment
from fedmeta.federation import RoundLoop, SiteLayoutFamily
from fedmeta.flower.deploy.local import deployment_config
from fedmeta.tasks import TaskSource

DP = {
    "client-central": {"mode": "client-central", "noise_multiplier": 1.0},
    "client-local": {"mode": "client-local", "noise_multiplier": 1.0},
    "task": {"mode": "task", "noise_multiplier": 1.0},
}


def _cfg(mode: str, **sections: Any) -> Config:
    base: dict[str, Any] = {
        "task": {"tasks_per_site": 8},
        "federation": {"clients_total": 4, "clients_per_round": 2, "sampling": "poisson"},
        "privacy": DP[mode],
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(base)


@pytest.mark.parametrize("mode", list(DP))
def test_every_dp_mode_refuses_federated_evaluation_naming_the_key(mode: str) -> None:
    with pytest.raises(ConfigError, match=rf"'eval.clients'.*must be 0 under privacy.mode '{mode}'.*without noise"):
        _cfg(mode, eval={"clients": 2})
    plain = config_from_dict({"federation": {"clients_total": 4, "clients_per_round": 2}, "eval": {"clients": 2}})
    assert plain.eval.clients == 2  # without DP it is allowed


def test_deploy_local_does_not_turn_federated_evaluation_on_under_dp(tmp_path: Path) -> None:
    from fedmeta.flower.deploy.local import prepare_heldout_site

    cfg = _cfg("client-central", task={"name": "sinusoid"})
    with pytest.raises(ConfigError, match=r"'eval.data_dir' must name held-out site folders"):
        deployment_config(cfg, 3)
    held = prepare_heldout_site(cfg, 3, tmp_path / "server_heldout")
    d = deployment_config(cfg, 3, heldout_dir=held)
    assert (d.eval.clients, d.eval.server, d.eval.data_dir) == (0, True, str(held))
    # the deployment server (no site data, model from the sites' answers) evaluates on that site
    loop = RoundLoop(d, tmp_path / "out", experiment=Experiment(d, family=SiteLayoutFamily("regression", (1,), 1)))
    assert loop._eval_tasks is not None and loop._eval_tasks.num_tasks == d.eval.tasks
    # the held-out site is written as site 3: none of the clients' sites 0..2
    sites = make_sites(cfg, 3, tmp_path / "sites")
    ours = _heldout_y(held)
    assert all(not np.array_equal(ours, _heldout_y(p)) for p in sites)


def _heldout_y(site: Path) -> np.ndarray:
    return np.load(site / "heldout" / "eval-0000.npz")["y"]


def test_server_held_out_tasks_over_site_folders_are_no_clients_own(tmp_path: Path) -> None:
    plain = _cfg("task", task={"name": "sinusoid"})
    make_sites(plain, 4, tmp_path / "sites", tasks_per_site=8, heldout_per_site=2)
    held = make_sites(plain, 1, tmp_path / "heldout", tasks_per_site=8, heldout_per_site=2, first=4)[0]
    folder = {"name": "folder", "data_dir": str(tmp_path / "sites"), "shots": 5, "query": 5}
    with pytest.raises(ConfigError, match=r"'eval.data_dir'.*heldout/ tasks are the sites' own"):
        _cfg("task", task=folder)
    with pytest.raises(ConfigError, match=r"'eval.data_dir'.*not task.data_dir itself"):
        _cfg("task", task=folder, eval={"data_dir": str(tmp_path / "sites")})
    cfg = _cfg("task", task=folder, eval={"data_dir": str(tmp_path / "heldout"), "tasks": 2})
    server = TaskSource(cfg).eval_tasks()
    site = TaskSource(config_from_dict({"task": {**folder, "data_dir": str(held)}, "eval": {"tasks": 2}}))
    assert torch.equal(server.support_y, site.eval_tasks().support_y)
    # main evaluated on the clients' own heldout/ tasks: those of sites 0..3
    assert all(not np.array_equal(_heldout_y(held), _heldout_y(p)) for p in sorted((tmp_path / "sites").iterdir()))
