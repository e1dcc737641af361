"""Task-level DP inside a site with Opacus' DP optimizer: clipping per task, calibrated noise, the site's epsilon."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from fedmeta.config import Config, config_from_dict
from fedmeta.errors import BudgetExhausted
from fedmeta.experiment import Experiment
from fedmeta.privacy.accountant import epsilon_for
from fedmeta.privacy.budget import BudgetTarget, rounds_that_fit
from fedmeta.privacy.clipping import clip_by_global_norm, global_l2_norm
from fedmeta.privacy.facade import ClientPrivacy
from fedmeta.privacy.task_level import TaskLevelPrivacy, poisson_indices, sample_site_tasks, site_pool_size
from fedmeta.rng import make_generator
from fedmeta.types import Params, TaskBatch


def _cfg(*, pool: int = 20, per_round: int = 5, algorithm: str = "maml", **privacy: object) -> Config:
    return config_from_dict(
        {
            "seed": 3,
            "task": {"name": "sinusoid", "shots": 5, "query": 5, "tasks_per_site": pool},
            "model": {"hidden": [16, 16]},
            "meta": {"algorithm": algorithm, "tasks_per_client": per_round},
            "federation": {"clients_total": 10, "clients_per_round": 4, "rounds": 50},
            "privacy": {"mode": "task", "noise_seed": 11, **privacy},
        }
    )


@pytest.fixture(scope="module")
def site() -> tuple[Experiment, Params, Params]:
    """A Meta-SGD site: meta-parameters (lr. rates included) and 6 tasks' exact meta-gradients."""
    exp = Experiment(_cfg(algorithm="metasgd"))
    meta = exp.initial_meta_params()
    tasks = TaskBatch.concat([exp.source.client_tasks(r, 0) for r in (1, 2)]).slice(0, 6)
    per_task, _ = exp.algorithm.task_updates(meta, tasks)
    return exp, meta, per_task


def _privacy(**kw: object) -> TaskLevelPrivacy:
    args = {"noise_multiplier": 1.0, "clip_norm": 1.0, "sample_rate": 0.25, "expected_tasks": 6.0, "delta": 1e-5}
    args.update(kw)
    return TaskLevelPrivacy(**args)  # type: ignore[arg-type]


def test_no_noise_and_no_clipping_gives_the_mean_meta_gradient(site: tuple[Experiment, Params, Params]) -> None:
    _, meta, per_task = site
    assert any(k.startswith("lr.") for k in per_task)  # Meta-SGD rates go through the same path
    out = _privacy(noise_multiplier=0.0, clip_norm=1e9).privatize(
        per_task, reference=meta, generator=make_generator(0, "n")
    )
    for k in meta:
        torch.testing.assert_close(out[k], per_task[k].mean(0), rtol=1e-5, atol=1e-7)


def test_every_task_is_clipped_and_bounds_its_influence(site: tuple[Experiment, Params, Params]) -> None:
    _, meta, per_task = site
    norms = [global_l2_norm({k: v[t] for k, v in per_task.items()}) for t in range(6)]
    clip = 0.5 * min(norms)  # every task gets clipped
    dp = _privacy(noise_multiplier=0.0, clip_norm=clip)
    out = dp.privatize(per_task, reference=meta, generator=make_generator(0, "n"))
    clipped = [clip_by_global_norm({k: v[t] for k, v in per_task.items()}, clip)[0] for t in range(6)]
    for k in meta:
        expected = torch.stack([c[k] for c in clipped]).sum(0) / 6.0
        torch.testing.assert_close(out[k], expected, rtol=1e-5, atol=1e-8)  # Opacus divides by norm + 1e-6
    # replacing one task by an arbitrary (huge) one moves the output by at most 2C / expected batch
    wild = {k: v.clone() for k, v in per_task.items()}
    for k in wild:
        wild[k][2] = 1e4 * torch.ones_like(wild[k][2])
    out2 = _privacy(noise_multiplier=0.0, clip_norm=clip).privatize(
        wild, reference=meta, generator=make_generator(0, "n")
    )
    moved = global_l2_norm({k: out2[k] - out[k] for k in meta})
    assert moved <= 2 * clip / 6.0 * (1 + 1e-5)


def test_noise_has_the_calibrated_std_and_repeats_under_the_same_seed() -> None:
    reference = {"w": torch.zeros(40_000), "lr.w": torch.zeros(40_000)}
    z, clip, expected = 1.3, 0.4, 8.0
    dp = _privacy(noise_multiplier=z, clip_norm=clip, expected_tasks=expected)
    a = dp.privatize(None, reference=reference, generator=make_generator(5, "noise"))  # empty Poisson batch: pure noise
    flat = torch.cat([v.flatten() for v in a.values()])
    # 80k samples: the sample std's relative standard error is 0.25%; 2% is 8 of them
    assert float(flat.std()) == pytest.approx(z * clip / expected, rel=0.02)
    assert abs(float(flat.mean())) < 5 * z * clip / expected / flat.numel() ** 0.5
    b = _privacy(noise_multiplier=z, clip_norm=clip, expected_tasks=expected).privatize(
        None, reference=reference, generator=make_generator(5, "noise")
    )
    c = _privacy(noise_multiplier=z, clip_norm=clip, expected_tasks=expected).privatize(
        None, reference=reference, generator=make_generator(6, "noise")
    )
    assert all(torch.equal(a[k], b[k]) for k in reference)
    assert not torch.equal(a["w"], c["w"])


def test_site_epsilon_matches_opacus_for_its_rate_and_steps_across_restarts(
    site: tuple[Experiment, Params, Params],
) -> None:
    from opacus.accountants import RDPAccountant

    _, meta, per_task = site
    q, z, steps = 0.25, 1.1, 12
    dp = _privacy(noise_multiplier=z, sample_rate=q)
    state = None
    for r in range(steps):
        if r % 5 == 0:  # the site's process restarts: its accountant comes back from its state
            dp = _privacy(noise_multiplier=z, sample_rate=q, state=state)
        dp.privatize(per_task if r % 3 else None, reference=meta, generator=make_generator(r, "n"))
        state = dp.state_dict()
    reference = RDPAccountant()
    for _ in range(steps):
        reference.step(noise_multiplier=z, sample_rate=q)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = reference.get_epsilon(delta=1e-5)
    assert dp.accountant.steps == steps
    assert dp.epsilon() == pytest.approx(expected, rel=1e-6)
    report = dp.report()
    assert report["privacy.epsilon"] == pytest.approx(expected, rel=1e-6)
    # the rate stays on the site (issue 15, finding 3: it used to be reported, and told the pool size)
    assert dp.sample_rate == q and "privacy.sample_rate" not in report
    assert (report["privacy.steps"], report["privacy.delta"]) == (steps, 1e-5)


def test_site_refuses_a_step_beyond_its_budget(site: tuple[Experiment, Params, Params]) -> None:
    _, meta, per_task = site
    target = 1.5
    fits = rounds_that_fit(BudgetTarget(target, 1e-5, 0.25), noise_multiplier=1.0, max_rounds=1000)
    dp = _privacy(target_epsilon=target)
    for r in range(fits):
        dp.privatize(per_task, reference=meta, generator=make_generator(r, "n"))
    with pytest.raises(BudgetExhausted, match=r"task-level privacy budget is spent.*privacy.target_epsilon=1.5"):
        dp.privatize(per_task, reference=meta, generator=make_generator(99, "n"))
    assert dp.accountant.steps == fits and dp.epsilon() <= target


def test_per_task_gradients_must_match_the_meta_parameters(site: tuple[Experiment, Params, Params]) -> None:
    _, meta, per_task = site
    with pytest.raises(ValueError, match="keys"):
        _privacy().privatize({"x": torch.zeros(2, 3)}, reference=meta, generator=make_generator(0, "n"))
    bad = {k: v[:, None] for k, v in per_task.items()}
    with pytest.raises(ValueError, match="shape"):
        _privacy().privatize(bad, reference=meta, generator=make_generator(0, "n"))


def test_poisson_task_sampling_has_the_configured_rate() -> None:
    sizes = torch.tensor(
        [len(poisson_indices(40, 0.1, make_generator(0, i))) for i in range(2000)], dtype=torch.float64
    )
    assert float(sizes.mean()) == pytest.approx(4.0, abs=0.15)  # mean of Binomial(40, 0.1); SE 0.04
    assert float(sizes.var()) == pytest.approx(40 * 0.1 * 0.9, rel=0.1)
    assert (sizes == 0).any()  # an empty batch happens and must be handled


def test_site_tasks_come_from_the_site_pool() -> None:
    cfg = _cfg(pool=12, per_round=3)
    exp = Experiment(cfg)
    pool = exp.source.site_pool(2)
    assert site_pool_size(exp.source, 2) == 12
    batch = sample_site_tasks(exp.source, 2, sample_rate=0.5, generator=make_generator(1, "t"))
    assert batch is not None and batch.params is not None
    for row in batch.params:
        assert any(torch.equal(row, p) for p in pool)


def test_client_facade_runs_a_task_level_round_and_persists(tmp_path: Path) -> None:
    cfg = _cfg(pool=10, per_round=5, noise_multiplier=0.9, clip_norm=2.0)
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    state: dict | None = None
    for r in range(1, 4):
        client = ClientPrivacy.for_site(cfg, 1, exp.source, state=state)
        tasks = client.sample_tasks(exp.source, r)
        per_task = None if tasks is None else exp.algorithm.task_updates(meta, tasks)[0]
        update, report = client.privatize_task_gradients(per_task, reference=meta, round_idx=r)
        assert set(update) == set(meta) and all(torch.isfinite(v).all() for v in update.values())
        state = client.state_dict()
    assert report["privacy.epsilon"] == pytest.approx(
        epsilon_for(noise_multiplier=0.9, sample_rate=0.5, steps=3, delta=1e-5), rel=1e-6
    )
    assert set(report) >= {"privacy.epsilon", "privacy.delta", "privacy.steps"}


def test_folder_sites_count_their_own_tasks(tmp_path: Path) -> None:
    from fedmeta.datagen import make_sites

    base = _cfg()
    make_sites(base, 2, tmp_path / "sites", tasks_per_site=8, heldout_per_site=2)
    cfg = config_from_dict(
        {
            "task": {"name": "folder", "shots": 5, "query": 5, "data_dir": str(tmp_path / "sites"),
                     "tasks_per_site": 8},
            "model": {"hidden": [16, 16]},
            "meta": {"tasks_per_client": 2},
            "federation": {"clients_total": 2, "clients_per_round": 2},
            "privacy": {"mode": "task", "noise_seed": 0},
            # under DP the server evaluates on held-out sites of its own, never the clients' (finding 4)
            "eval": {"data_dir": str(tmp_path / "server-heldout")},
        }
    )
    exp = Experiment(cfg)
    assert site_pool_size(exp.source, 1) == 8
    client = ClientPrivacy.for_site(cfg, 1, exp.source)
    assert client.site is not None and client.site.sample_rate == pytest.approx(2 / 8)
    batches = [client.sample_tasks(exp.source, r) for r in range(1, 6)]
    drawn = [b for b in batches if b is not None]
    assert drawn and all(b.support_x.shape[1:] == (5, 1) and b.num_tasks <= 8 for b in drawn)


def test_two_steps_in_one_round_never_share_noise() -> None:
    # meta.local_steps > 1: every local DP step of a round needs fresh noise, and is accounted
    cfg = config_from_dict(
        {
            "task": {"tasks_per_site": 10},
            "meta": {"tasks_per_client": 2, "local_steps": 3},
            "federation": {"rounds": 7},
            "privacy": {"mode": "task", "noise_seed": 1},
        }
    )
    client = ClientPrivacy(cfg, 0)
    ref = {"w": torch.zeros(100)}
    first, _ = client.privatize_task_gradients(None, reference=ref, round_idx=4)
    second, report = client.privatize_task_gradients(None, reference=ref, round_idx=4)
    assert not torch.equal(first["w"], second["w"])
    assert report["privacy.steps"] == 2

    from fedmeta.privacy.budget import plan_privacy

    plan = plan_privacy(cfg)
    assert plan.steps == 21
    assert plan.epsilon == pytest.approx(
        epsilon_for(noise_multiplier=1.0, sample_rate=0.2, steps=21, delta=1e-5), rel=1e-6
    )


def _folder_task_cfg(root: Path, **task: object) -> Config:
    return config_from_dict(
        {
            "task": {"name": "folder", "shots": 5, "query": 5, "data_dir": str(root), **task},
            "model": {"hidden": [16, 16]},
            "meta": {"tasks_per_client": 2},
            "federation": {"clients_total": 2, "clients_per_round": 2, "rounds": 3},
            "privacy": {"mode": "task", "noise_seed": 0, "noise_multiplier": 1.1},
            # under DP the server evaluates on held-out sites of its own, never the clients' (finding 4)
            "eval": {"data_dir": str(root.parent / "server-heldout")},
        }
    )


def test_nothing_a_site_sends_depends_on_its_task_count(tmp_path: Path) -> None:
    # issue 15, finding 3: the start-up answer held the site's task count and every reply its
    # sample rate tasks_per_client / count, although add/remove-one-task adjacency protects the count
    from fedmeta.datagen import make_sites
    from fedmeta.errors import ConfigError
    from fedmeta.federation import describe_client
    from fedmeta.privacy.budget import plan_privacy
    from fedmeta.privacy.client_update import private_round

    with pytest.raises(ConfigError, match=r"'task.tasks_per_site' must be set for privacy.mode 'task'.*folder sites"):
        _folder_task_cfg(tmp_path)  # the rate would have to come from the site's own count
    make_sites(_cfg(), 2, tmp_path / "small", tasks_per_site=6, heldout_per_site=1)
    make_sites(_cfg(), 2, tmp_path / "large", tasks_per_site=12, heldout_per_site=1)
    sent = []
    for which in ("small", "large"):
        cfg = _folder_task_cfg(tmp_path / which, tasks_per_site=4)
        exp = Experiment(cfg)
        assert describe_client(exp, 1, None).num_tasks == 0
        client = ClientPrivacy.for_site(cfg, 1, exp.source)
        assert client.site is not None and client.site.sample_rate == 2 / 4  # public: not 2/6 or 2/12
        assert client.site.expected_tasks == 2.0
        _, report, _ = private_round(exp, exp.initial_meta_params(), 1, 1, state=None)
        sent.append(report)
        plan = plan_privacy(replace_rounds(cfg, 1))
        assert report["privacy.epsilon"] == pytest.approx(plan.epsilon, rel=1e-9)  # the server could compute it
    assert sent[0] == sent[1] and set(sent[0]) == {"privacy.epsilon", "privacy.delta", "privacy.steps"}
    # without DP the count is sent (it is only a description of the site)
    plain = config_from_dict(
        {
            "task": {"name": "folder", "shots": 5, "query": 5, "data_dir": str(tmp_path / "large")},
            "federation": {"clients_total": 2, "clients_per_round": 2},
        }
    )
    assert describe_client(Experiment(plain), 1, None).num_tasks == 12


def replace_rounds(cfg: Config, rounds: int) -> Config:
    """``cfg`` with ``federation.rounds = rounds``."""
    from dataclasses import replace

    return replace(cfg, federation=replace(cfg.federation, rounds=rounds))
