"""Pure clipping and noise (fedmeta.privacy.clipping): norms are bounded, noise has the calibrated std."""

from __future__ import annotations

import math

import pytest
import torch
from scipy import stats

from fedmeta.privacy.clipping import (
    add_gaussian_noise,
    central_private_mean,
    clip_by_global_norm,
    clipped_sum,
    gaussian_noise,
    global_l2_norm,
    noise_share_std,
    privatize_update,
)
from fedmeta.rng import make_generator
from fedmeta.types import Params


def _meta_sgd_like(gen: torch.Generator, scale: float) -> Params:
    """An update shaped like a small Meta-SGD meta-parameter dict (model weights and lr. rates)."""
    return {
        "net.0.weight": scale * torch.randn(40, 1, generator=gen),
        "net.0.bias": scale * torch.randn(40, generator=gen),
        "net.2.weight": scale * torch.randn(1, 40, generator=gen),
        "lr.net.0.weight": scale * torch.randn(40, 1, generator=gen),
        "lr.net.2.weight": scale * torch.randn(1, 40, generator=gen),
    }


def test_global_norm_covers_every_tensor_including_learning_rates() -> None:
    update = {"w": torch.tensor([3.0]), "lr.w": torch.tensor([4.0])}
    assert global_l2_norm(update) == pytest.approx(5.0)


@pytest.mark.parametrize("clip_norm", [1e-3, 0.5, 1.0, 10.0])
def test_clipping_bounds_the_norm_of_every_update(clip_norm: float) -> None:
    gen = make_generator(0, "clip-test")
    for i in range(50):
        scale = 10 ** (i / 10 - 2.5)  # norms from ~1e-2 to ~1e3
        update = _meta_sgd_like(gen, scale)
        before = global_l2_norm(update)
        clipped, norm = clip_by_global_norm(update, clip_norm)
        after = global_l2_norm(clipped)
        assert norm == pytest.approx(before)
        assert after <= clip_norm * (1 + 1e-6)
        if before <= clip_norm:
            assert all(torch.equal(clipped[k], update[k]) for k in update)  # untouched
        else:
            assert after == pytest.approx(clip_norm, rel=1e-5)  # scaled exactly onto the sphere
            ratio = {k: clipped[k] / update[k] for k in update}
            common = ratio["net.0.weight"].flatten()[0]
            assert all(torch.allclose(r, common.expand_as(r)) for r in ratio.values())  # direction kept


def test_learning_rates_alone_can_trigger_clipping() -> None:
    update = {"w": torch.full((3,), 1e-3), "lr.w": torch.full((3,), 10.0)}
    clipped, _ = clip_by_global_norm(update, 1.0)
    assert global_l2_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    assert float(clipped["lr.w"].abs().max()) < 1.0


def test_clipping_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="clip_norm must be positive"):
        clip_by_global_norm({"w": torch.ones(2)}, 0.0)
    with pytest.raises(ValueError, match="NaN or Inf"):
        clip_by_global_norm({"w": torch.tensor([float("nan")])}, 1.0)


def test_noise_has_the_calibrated_std_and_is_gaussian() -> None:
    reference = {"a": torch.zeros(300, 300), "b": torch.zeros(50_000)}
    std = 1.3 * 0.7  # noise_multiplier x clip_norm
    noise = gaussian_noise(reference, std, make_generator(0, "noise-test"))
    flat = torch.cat([v.flatten() for v in noise.values()]).double()
    n = flat.numel()
    # sample std of n Gaussians has relative standard error 1/sqrt(2n) ~ 0.0017 here: 1% is ~6 SE
    assert float(flat.std()) == pytest.approx(std, rel=0.01)
    assert abs(float(flat.mean())) < 5 * std / math.sqrt(n)
    ks = stats.kstest((flat / std).numpy(), "norm")
    assert ks.pvalue > 1e-3
    assert {k: v.shape for k, v in noise.items()} == {k: v.shape for k, v in reference.items()}


def test_noise_repeats_under_the_same_seed_and_differs_under_another() -> None:
    ref = _meta_sgd_like(make_generator(1, "ref"), 1.0)
    a = gaussian_noise(ref, 0.5, make_generator(7, "n"))
    b = gaussian_noise(ref, 0.5, make_generator(7, "n"))
    c = gaussian_noise(ref, 0.5, make_generator(8, "n"))
    assert all(torch.equal(a[k], b[k]) for k in ref)
    assert not any(torch.equal(a[k], c[k]) for k in ref)
    # drawn in sorted key order: independent of the dict's insertion order
    shuffled = {k: ref[k] for k in reversed(list(ref))}
    d = gaussian_noise(shuffled, 0.5, make_generator(7, "n"))
    assert all(torch.equal(a[k], d[k]) for k in ref)


def test_zero_std_adds_nothing() -> None:
    update = _meta_sgd_like(make_generator(2, "u"), 1.0)
    out = add_gaussian_noise(update, 0.0, make_generator(0, "n"))
    assert all(torch.equal(out[k], update[k]) for k in update)
    with pytest.raises(ValueError, match="non-negative"):
        gaussian_noise(update, -1.0, make_generator(0, "n"))


def test_central_mean_is_clipped_sum_plus_calibrated_noise_over_expected_count() -> None:
    gen = make_generator(3, "updates")
    updates = [_meta_sgd_like(gen, s) for s in (0.01, 0.1, 1.0, 5.0, 50.0)]
    ref = updates[0]
    clip, z, expected = 0.8, 1.1, 7.0
    out, norms = central_private_mean(
        updates,
        reference=ref,
        clip_norm=clip,
        noise_multiplier=z,
        expected_count=expected,
        generator=make_generator(9, "noise"),
    )
    total, _ = clipped_sum(updates, clip, reference=ref)
    noise = gaussian_noise(ref, z * clip, make_generator(9, "noise"))
    for k in ref:
        torch.testing.assert_close(out[k], (total[k] + noise[k]) / expected, rtol=1e-5, atol=1e-6)
    assert norms == pytest.approx([global_l2_norm(u) for u in updates])
    # the sum of clipped updates is bounded by count x C
    assert global_l2_norm(total) <= len(updates) * clip * (1 + 1e-6)


def test_central_mean_without_noise_and_clipping_is_the_plain_mean() -> None:
    gen = make_generator(4, "updates")
    updates = [_meta_sgd_like(gen, 1.0) for _ in range(6)]
    out, _ = central_private_mean(
        updates,
        reference=updates[0],
        clip_norm=1e12,
        noise_multiplier=0.0,
        expected_count=6,
        generator=make_generator(0, "n"),
    )
    for k in updates[0]:
        torch.testing.assert_close(out[k], torch.stack([u[k] for u in updates]).mean(0), rtol=1e-6, atol=1e-7)


def test_empty_cohort_releases_pure_noise() -> None:
    ref = {"w": torch.zeros(20_000)}
    out, norms = central_private_mean(
        [], reference=ref, clip_norm=2.0, noise_multiplier=1.5, expected_count=4, generator=make_generator(0, "n")
    )
    assert norms == []
    assert float(out["w"].std()) == pytest.approx(1.5 * 2.0 / 4, rel=0.03)


def test_privatize_update_is_clip_then_noise() -> None:
    update = _meta_sgd_like(make_generator(5, "u"), 3.0)
    noisy, norm = privatize_update(update, clip_norm=1.0, noise_std=0.25, generator=make_generator(1, "n"))
    clipped, _ = clip_by_global_norm(update, 1.0)
    noise = gaussian_noise(update, 0.25, make_generator(1, "n"))
    assert norm == pytest.approx(global_l2_norm(update))
    for k in update:
        torch.testing.assert_close(noisy[k], clipped[k] + noise[k])


def test_noise_shares_sum_to_the_central_noise() -> None:
    # secure-aggregation split: n parties with std zC/sqrt(n) each sum to std zC
    n, z, clip = 16, 1.2, 0.5
    share = noise_share_std(noise_multiplier=z, clip_norm=clip, num_shares=n)
    ref = {"w": torch.zeros(40_000)}
    total = sum(gaussian_noise(ref, share, make_generator(i, "share"))["w"] for i in range(n))
    assert float(total.std()) == pytest.approx(z * clip, rel=0.02)
    with pytest.raises(ValueError):
        noise_share_std(noise_multiplier=z, clip_norm=clip, num_shares=0)


def test_clipped_sum_handles_zero_and_rejects_non_finite_updates() -> None:
    ref = {"w": torch.zeros(3), "lr.w": torch.zeros(3)}
    zero = {"w": torch.zeros(3), "lr.w": torch.zeros(3)}
    big = {"w": torch.full((3,), 10.0), "lr.w": torch.zeros(3)}
    total, norms = clipped_sum([zero, big], 1.0, reference=ref)
    assert norms == pytest.approx([0.0, math.sqrt(300.0)])
    torch.testing.assert_close(total["w"], torch.full((3,), 1 / math.sqrt(3)))
    with pytest.raises(ValueError, match="NaN or Inf"):
        clipped_sum([{"w": torch.tensor([math.inf, 0, 0]), "lr.w": torch.zeros(3)}], 1.0, reference=ref)
