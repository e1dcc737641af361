"""Task families: definitions, determinism, held-out disjointness, on-disk sites."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.config import config_from_dict
from fedmeta.errors import ConfigError, DataFormatError
from fedmeta.tasks import TaskSource
from fedmeta.tasks.folder import FolderFamily, write_site
from fedmeta.tasks.regression import HarmonicFamily, SinusoidFamily


def test_sinusoid_is_mamls_definition() -> None:
    fam = SinusoidFamily(shots=10, query=10)
    batch = fam.sample(torch.Generator().manual_seed(0), 500)
    amp, phase = batch.params[:, 0], batch.params[:, 1]
    assert float(amp.min()) >= 0.1 and float(amp.max()) <= 5.0
    assert float(phase.min()) >= 0.0 and float(phase.max()) <= math.pi
    x = torch.cat([batch.support_x, batch.query_x], dim=1)
    assert float(x.min()) >= -5.0 and float(x.max()) <= 5.0
    y = torch.cat([batch.support_y, batch.query_y], dim=1)
    torch.testing.assert_close(y, amp.view(-1, 1, 1) * torch.sin(x - phase.view(-1, 1, 1)))
    assert batch.support_x.shape == (500, 10, 1) and batch.query_x.shape == (500, 10, 1)


def test_harmonic_tasks_solve_their_ode() -> None:
    fam = HarmonicFamily(shots=5, query=5)
    params = fam.sample_params(torch.Generator().manual_seed(1), 20, "train").double()
    x = torch.linspace(0.1, 4.9, 50, dtype=torch.float64).view(1, -1, 1).expand(20, -1, -1).clone().requires_grad_(True)
    y = fam.function(params, x)
    dy = torch.autograd.grad(y.sum(), x, create_graph=True)[0]
    d2y = torch.autograd.grad(dy.sum(), x)[0]
    residual = HarmonicFamily.ode_residual(params, y.detach(), dy.detach(), d2y)
    assert float(residual.abs().max()) < 1e-9
    assert float(y.detach().abs().max()) > 0.1


def _cfg(**task):
    return config_from_dict(
        {
            "seed": 5,
            "task": task,
            "meta": {"tasks_per_client": 2},
            "federation": {"clients_total": 10, "clients_per_round": 3},
            "eval": {"tasks": 50},
        }
    )


def test_same_seed_same_tasks_different_seed_different_tasks() -> None:
    a = TaskSource(_cfg()).client_tasks(3, 7)
    b = TaskSource(_cfg()).client_tasks(3, 7)
    assert torch.equal(a.support_x, b.support_x) and torch.equal(a.query_y, b.query_y)
    other = TaskSource(config_from_dict({"seed": 6, "meta": {"tasks_per_client": 2}})).client_tasks(3, 7)
    assert not torch.equal(a.params, other.params)
    assert not torch.equal(a.params, TaskSource(_cfg()).client_tasks(4, 7).params)
    assert not torch.equal(a.params, TaskSource(_cfg()).client_tasks(3, 8).params)


@pytest.mark.parametrize("pool", [None, 4])
def test_heldout_tasks_never_appear_in_training(pool: int | None) -> None:
    src = TaskSource(_cfg(tasks_per_site=pool))
    train = {tuple(p.tolist()) for r in range(1, 30) for c in range(10) for p in src.client_tasks(r, c).params}
    held = {tuple(p.tolist()) for p in src.eval_tasks().params}
    assert len(held) == 50 and not (train & held)


def test_site_pool_is_fixed_per_client() -> None:
    src = TaskSource(_cfg(tasks_per_site=3))
    pool = {tuple(p.tolist()) for p in src.site_pool(2)}
    seen = {tuple(p.tolist()) for r in range(1, 20) for p in src.client_tasks(r, 2).params}
    assert seen <= pool and len(seen) == 3


def _regression_site(tmp_path: Path, n: int = 30) -> Path:
    rng = np.random.default_rng(0)
    tasks = [
        (f"t{i}", rng.uniform(-1, 1, (n, 2)).astype(np.float32), rng.normal(size=n).astype(np.float32))
        for i in range(4)
    ]
    return write_site(tmp_path / "site", tasks, kind="regression", heldout=tasks[:1])


def test_folder_family_reads_sites_and_draws_fresh_splits(tmp_path: Path) -> None:
    site = _regression_site(tmp_path)
    fam = FolderFamily(site, shots=5, query=6)
    assert fam.input_shape == (2,) and fam.output_dim == 1 and fam.kind == "regression"
    batch = fam.sample(torch.Generator().manual_seed(0), 3, "train")
    assert batch.support_x.shape == (3, 5, 2) and batch.query_y.shape == (3, 6, 1)
    held = fam.sample(torch.Generator().manual_seed(0), 2, "eval")
    assert set(held.ids) == {"t0"}


def test_folder_declared_split_and_classification(tmp_path: Path) -> None:
    root = tmp_path / "cls"
    (root / "tasks").mkdir(parents=True)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(60, 1, 4, 4)).astype(np.float32)
    y = np.repeat(np.arange(6), 10)
    np.savez(root / "tasks" / "a.npz", x=x, y=y)
    np.savez(root / "tasks" / "b.npz", support_x=x[:30], support_y=y[:30] % 3, query_x=x[30:], query_y=y[30:] % 3)
    (root / "site.yaml").write_text("kind: classification\n")
    fam = FolderFamily(root, shots=2, query=3, ways=3)
    batch = fam.sample(torch.Generator().manual_seed(0), 2)
    assert batch.support_x.shape == (2, 6, 1, 4, 4) and batch.support_y.dtype == torch.int64
    for i in range(2):
        assert sorted(batch.support_y[i].tolist()) == [0, 0, 1, 1, 2, 2]
        assert sorted(batch.query_y[i].tolist()) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


def test_folder_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match="does not exist"):
        FolderFamily(tmp_path / "missing", shots=1, query=1)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match="no 'tasks/' folder"):
        FolderFamily(tmp_path / "empty", shots=1, query=1)
    site = tmp_path / "bad"
    (site / "tasks").mkdir(parents=True)
    (site / "tasks" / "broken.npz").write_bytes(b"not a zip")
    with pytest.raises(DataFormatError, match="broken.npz' is not a readable"):
        FolderFamily(site, shots=1, query=1)
    (site / "tasks" / "broken.npz").unlink()
    np.savez(site / "tasks" / "wrong.npz", inputs=np.zeros(3))
    with pytest.raises(DataFormatError, match="wrong.npz' must contain arrays 'x' and 'y'"):
        FolderFamily(site, shots=1, query=1)
    (site / "tasks" / "wrong.npz").unlink()
    np.savez(site / "tasks" / "short.npz", x=np.zeros((4, 1)), y=np.zeros(4))
    with pytest.raises(DataFormatError, match="short.npz' has 4 examples.*needs 10"):
        FolderFamily(site, shots=5, query=5)
    np.savez(site / "tasks" / "short.npz", x=np.zeros((4, 1)), y=np.zeros(3))
    with pytest.raises(DataFormatError, match="'x' has 4 examples but 'y' has 3"):
        FolderFamily(site, shots=1, query=1)
    np.savez(site / "tasks" / "short.npz", x=np.full((4, 1), np.nan), y=np.zeros(4))
    with pytest.raises(DataFormatError, match="NaN or Inf"):
        FolderFamily(site, shots=1, query=1)


def test_folder_of_sites_maps_clients_to_sites(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    for s in range(3):
        tasks = [
            (f"t{i}", rng.normal(size=(20, 1)).astype(np.float32), np.full(20, float(s), np.float32)) for i in range(2)
        ]
        write_site(tmp_path / f"site-{s:04d}", tasks, kind="regression", heldout=tasks[:1])
    cfg = config_from_dict(
        {
            "task": {"name": "folder", "data_dir": str(tmp_path), "shots": 3, "query": 3},
            "federation": {"clients_total": 3, "clients_per_round": 3},
            "eval": {"tasks": 6},
        }
    )
    src = TaskSource(cfg)
    assert src.num_sites == 3
    for client in range(3):
        batch = src.client_tasks(1, client)
        assert torch.all(batch.support_y == client)
    held = src.eval_tasks()
    assert held.num_tasks == 6 and set(held.support_y.flatten().tolist()) == {0.0, 1.0, 2.0}


def _write_regression_sites(root: Path, sites: int) -> None:
    rng = np.random.default_rng(3)
    for s in range(sites):
        y = np.full(20, float(s), np.float32)
        tasks = [(f"t{i}", rng.normal(size=(20, 1)).astype(np.float32), y) for i in range(2)]
        write_site(root / f"site-{s:04d}", tasks, kind="regression", heldout=tasks[:1])


def _folder_cfg(root: Path, *, clients: int, **extra: object):
    task = {"name": "folder", "data_dir": str(root), "shots": 3, "query": 3, **extra.pop("task", {})}  # type: ignore[dict-item]
    return config_from_dict(
        {"task": task, "federation": {"clients_total": clients, "clients_per_round": 2}, "eval": {"tasks": 4}, **extra}
    )


def test_fewer_sites_than_clients_is_refused_naming_the_keys_and_the_folder(tmp_path: Path) -> None:
    # issue 15, finding 1: client c silently read site c mod sites, so one site entered as several clients
    _write_regression_sites(tmp_path, 2)
    with pytest.raises(ConfigError, match=r"'.*' holds 2 sites but federation.clients_total is 5.*task.share_sites"):
        TaskSource(_folder_cfg(tmp_path, clients=5))


def test_one_site_folder_is_client_zeros_unless_shared(tmp_path: Path) -> None:
    _write_regression_sites(tmp_path, 1)
    site = tmp_path / "site-0000"
    src = TaskSource(_folder_cfg(site, clients=3))
    assert torch.all(src.client_tasks(1, 0).support_y == 0)
    why = r"client 1 has no site of its own.*federation.clients_total=3.*task.share_sites"
    with pytest.raises(ConfigError, match=why):
        src.client_tasks(1, 1)
    # a node given its own data folder (a SuperNode's data-dir) reads it as whichever client it is
    own = TaskSource(_folder_cfg(site, clients=3), data_dir=str(site))
    assert torch.all(own.client_tasks(1, 2).support_y == 0)


def test_sharing_sites_is_an_explicit_opt_in(tmp_path: Path) -> None:
    _write_regression_sites(tmp_path, 2)
    src = TaskSource(_folder_cfg(tmp_path, clients=5, task={"share_sites": True}))
    assert [int(src.client_tasks(1, c).support_y[0, 0, 0]) for c in range(5)] == [0, 1, 0, 1, 0]


@pytest.mark.parametrize("mode", ["client-central", "client-local", "task"])
def test_every_dp_mode_refuses_shared_sites(tmp_path: Path, mode: str) -> None:
    privacy = {"mode": mode, "noise_multiplier": 1.0}
    extra = {"federation": {"sampling": "poisson"}} if mode == "client-central" else {}
    with pytest.raises(ConfigError, match=rf"'task.share_sites'.*privacy.mode '{mode}'"):
        config_from_dict(
            {
                "task": {"name": "folder", "data_dir": str(tmp_path), "share_sites": True, "tasks_per_site": 4},
                "privacy": privacy,
                **extra,
            }
        )
