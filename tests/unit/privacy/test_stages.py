"""The server stages privacy mechanisms contribute: client-central as clip -> sum -> noise -> mean."""

from __future__ import annotations

import io
from typing import Any

import pytest
import torch

from fedmeta.config import Config, config_from_dict
from fedmeta.federation.loop import ClientReply
from fedmeta.federation.stages import RoundState, build_stages, load_stage_states, stage_states
from fedmeta.optim import ServerOptimizer
from fedmeta.privacy.adaptive import clipped_indicator, next_clip_norm, noisy_unclipped_fraction
from fedmeta.privacy.clipping import central_private_mean
from fedmeta.privacy.facade import CLIP_NORM_KEY, ServerPrivacy
from fedmeta.privacy.randomness import privacy_generator
from fedmeta.privacy.stages import ClippedSumStage
from fedmeta.rng import make_generator
from fedmeta.types import Params


def _cfg(mode: str = "client-central", **privacy: Any) -> Config:
    return config_from_dict(
        {
            "federation": {
                "clients_total": 40, "clients_per_round": 10, "rounds": 8,
                "sampling": "poisson" if mode == "client-central" else "uniform",
            },
            "meta": {"outer_optimizer": "sgd", "outer_lr": 0.1},
            "privacy": {"mode": mode, "noise_seed": 3, "clip_norm": 0.8, "noise_multiplier": 0.7, **privacy},
        }
    )  # fmt: skip


REF = {"w": torch.zeros(7), "lr.w": torch.zeros(3)}


def _updates(n: int, seed: int) -> list[Params]:
    gen = make_generator(seed, "stage-updates")
    return [{"w": torch.randn(7, generator=gen), "lr.w": 0.3 * torch.randn(3, generator=gen)} for _ in range(n)]


def _run(server: ServerPrivacy, round_idx: int, updates: list[Params]) -> RoundState:
    state = RoundState(round_idx, REF, [ClientReply(i, u, 1, {}) for i, u in enumerate(updates)])
    for stage in server.server_stages():
        stage(state)
    return state


@pytest.mark.parametrize("adaptive", [False, True])
def test_client_central_stages_release_exactly_the_one_call_private_mean(adaptive: bool) -> None:
    cfg = _cfg(adaptive_clipping=adaptive)
    server = ServerPrivacy(cfg)
    assert [s.name for s in server.server_stages()] == ["clip", "sum", "noise", "mean"]
    clip = 0.8
    for r, n in [(1, 6), (2, 0), (3, 11)]:  # round 2: an empty Poisson cohort releases pure noise
        updates = _updates(n, r)
        state = _run(server, r, updates)
        expected, norms = central_private_mean(
            updates, reference=REF, clip_norm=clip, noise_multiplier=server.update_noise_multiplier,
            expected_count=10.0, generator=privacy_generator(server.secret_seed, "noise", r),
        )  # fmt: skip
        assert state.denominator is None and state.aggregate is not None
        for k in REF:
            assert torch.equal(state.aggregate[k], expected[k])  # bit for bit: same float ops, same draws
        assert server.round_info["clip_norm"] == clip
        assert server.round_info["noise_std"] == server.update_noise_multiplier * clip
        if adaptive:
            frac = noisy_unclipped_fraction(
                [clipped_indicator(x, clip) for x in norms], count_stddev=server.count_stddev, expected_count=10.0,
                generator=privacy_generator(server.secret_seed, "count", r),
            )  # fmt: skip
            clip = next_clip_norm(clip, frac, target_quantile=cfg.privacy.target_quantile, lr=cfg.privacy.clip_lr)
            assert server.round_info["unclipped_fraction"] == frac
        assert server.clip_norm == clip and server.client_config(r + 1)[CLIP_NORM_KEY] == clip
    assert adaptive == (clip != 0.8)


def test_the_clip_norm_is_the_clip_stages_state_saved_by_name_and_old_checkpoints_still_load() -> None:
    cfg = _cfg(adaptive_clipping=True)
    server = ServerPrivacy(cfg)
    for r in range(1, 4):
        _run(server, r, _updates(8, r))
    moved = server.clip_norm
    assert moved != 0.8
    opt = ServerOptimizer({k: v.clone() for k, v in REF.items()}, name="sgd", lr=0.1)
    chain = build_stages(cfg, server, opt, update_transforms=[lambda r, reps: reps])
    assert [s.name for s in chain] == ["replies-0", "clip", "sum", "noise", "mean", "optimizer"]
    saved = stage_states(chain, skip=("optimizer",))
    assert saved == {"clip": {"clip_norm": moved}}
    assert "clip_norm" not in server.state_dict()  # not twice: the privacy entry keeps accountant and counters
    buf = io.BytesIO()
    torch.save({"stages": saved, "accountant": server.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed = ServerPrivacy(cfg)
    resumed.load_state_dict(ckpt["accountant"])
    load_stage_states(build_stages(cfg, resumed, opt), ckpt["stages"], path="c.pt")
    assert resumed.clip_norm == moved
    after_resume, uninterrupted = _run(resumed, 4, _updates(5, 4)).aggregate, _run(server, 4, _updates(5, 4)).aggregate
    assert after_resume is not None and uninterrupted is not None
    assert all(torch.equal(after_resume[k], uninterrupted[k]) for k in REF)
    # a checkpoint written before the split holds the clip norm in its privacy entry
    old = ServerPrivacy(cfg)
    old.load_state_dict({**ServerPrivacy(cfg).state_dict(), "clip_norm": 1.7})
    assert old.clip_norm == 1.7


def test_client_local_clip_stage_owns_the_norm_sent_out_and_task_mode_sends_the_configured_one() -> None:
    local = ServerPrivacy(_cfg("client-local"))
    assert [s.name for s in local.server_stages()] == ["aggregate", "clip"]
    assert local.client_config(1)[CLIP_NORM_KEY] == 0.8
    task = ServerPrivacy(config_from_dict({"task": {"tasks_per_site": 10}, "privacy": {"mode": "task"}}))
    assert [s.name for s in task.server_stages()] == ["aggregate"]
    assert task.client_config(1)[CLIP_NORM_KEY] == task.cfg.privacy.clip_norm


def test_a_stage_without_what_it_needs_names_itself() -> None:
    server = ServerPrivacy(_cfg())
    state = RoundState(1, REF, [ClientReply(0, _updates(1, 0)[0], 1, {})])
    with pytest.raises(ValueError, match=r"server stage 'sum' needs clip_factors from a stage before it"):
        ClippedSumStage(server)(state)
    server_stages = server.server_stages()
    server_stages[0](state)
    server_stages[1](state)
    opt = ServerOptimizer({k: v.clone() for k, v in REF.items()}, name="sgd", lr=0.1)
    optimizer = build_stages(_cfg(), server, opt)[-1]
    with pytest.raises(ValueError, match=r"'optimizer' got an undivided sum"):
        optimizer(state)
