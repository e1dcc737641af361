"""Differential privacy in real Flower simulations (Ray backend): one simulation per mode.

Each test records, with an ``aggregate_transforms`` hook of the real server, every round's
aggregate and the replies it was made from, and checks them against an independent
reconstruction from the pure functions: the clients' raw meta-updates are recomputed from the
meta-parameters of the round, clipped with ``clip_by_global_norm`` and the noise is redrawn from
the documented generator (``privacy.noise_seed`` is fixed). The per-round epsilon in
``metrics.jsonl`` is checked against Opacus' own accountant, and the final meta-parameters
against the centralized reference under the same DP mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.config import Config
from fedmeta.errors import InconsistentReplies
from fedmeta.experiment import Experiment
from fedmeta.federation import ClientReply
from fedmeta.outputs import read_metrics
from fedmeta.privacy.clipping import clip_by_global_norm, clipped_sum, gaussian_noise, global_l2_norm
from fedmeta.privacy.facade import ServerPrivacy
from fedmeta.privacy.randomness import privacy_generator
from fedmeta.sampling import sample_clients
from fedmeta.types import Params
from tests.integration.faults import Faults
from tests.privacy_helpers import dp_config, opacus_rdp_epsilon

pytestmark = pytest.mark.slow

NOISE_SEED = 7  # dp_config's privacy.noise_seed
LR = 0.05  # dp_config's server SGD step: meta_r = meta_(r-1) - LR * aggregate_r


class Recorder:
    """An aggregate transform that changes nothing and remembers what the server aggregated."""

    def __init__(self) -> None:
        self.aggregates: dict[int, Params] = {}
        self.replies: dict[int, list[ClientReply]] = {}

    def __call__(self, round_idx: int, aggregate: Params, replies: list[ClientReply]) -> Params:
        self.aggregates[round_idx] = {k: v.detach().clone() for k, v in aggregate.items()}
        self.replies[round_idx] = list(replies)
        return aggregate

    def metas(self, exp: Experiment) -> dict[int, Params]:
        """The meta-parameters each round started from (server SGD without momentum)."""
        meta = exp.initial_meta_params()
        out = {}
        for r in sorted(self.aggregates):
            out[r] = meta
            meta = {k: v - LR * self.aggregates[r][k] for k, v in meta.items()}
        return out


def _simulate(cfg: Config, out: Path, recorder: Recorder, **kwargs: Any) -> dict[str, Any]:
    from fedmeta.flower.simulation import simulate

    return simulate(cfg, out, aggregate_transforms=[recorder], num_cpus=2, **kwargs)


def _same_final_params_as_the_reference(cfg: Config, out: Path, tmp_path: Path) -> None:
    run_centralized(cfg, tmp_path / "reference")
    a = load_checkpoint(out / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "reference" / "checkpoint.pt")
    assert a["round"] == b["round"] and a["accountant"] == b["accountant"]
    for k, v in b["meta_params"].items():
        torch.testing.assert_close(a["meta_params"][k], v, rtol=1e-4, atol=1e-6)


def test_client_central_aggregate_epsilon_and_resume_in_a_real_simulation(tmp_path: Path) -> None:
    """DP-FedAvg on the server: Poisson cohorts, clipped sum plus seeded noise over the expected
    cohort; the run crashes in round 3 and resumes from the checkpoint of round 2."""
    sigma, clip, total, per_round = 1.2, 0.5, 10, 4
    cfg = dp_config(
        "client-central", rounds=4, total=total, per_round=per_round, noise_multiplier=sigma, clip_norm=clip
    )
    cohorts = {r: ServerPrivacy(cfg).sample_clients(r) for r in range(1, 5)}
    assert cohorts[3], "round 3 must draw someone for the injected failure to stop the run"
    out, recorder = tmp_path / "sim", Recorder()
    with pytest.raises(InconsistentReplies, match="round 3: only 0 valid replies"):
        _simulate(cfg, out, recorder, client_mods=[Faults(fail_from_round=3)])
    assert load_checkpoint(out / "checkpoint.pt")["accountant"]["accountant"]["steps"] == [2]
    summary = _simulate(cfg, out, recorder, resume=True)

    q = per_round / total
    rows = {r["round"]: r for r in read_metrics(out / "metrics.jsonl") if r["round"] > 0}
    assert sorted(rows) == [1, 2, 3, 4]
    for r, row in rows.items():  # nothing double-counted across the restart
        assert row["privacy"]["epsilon"] == pytest.approx(opacus_rdp_epsilon(sigma, q, r), rel=1e-6), r
        assert (row["clients"], row["replies"], row["privacy"]["sample_rate"]) == (len(cohorts[r]), len(cohorts[r]), q)
        assert row["train"] == {}
    priv = summary["privacy"]
    assert priv["epsilon"] == pytest.approx(opacus_rdp_epsilon(sigma, q, 4), rel=1e-6)
    assert (priv["mode"], priv["delta"], priv["noise_multiplier"], priv["clip_norm"], priv["accountant"]) == (
        "client-central",
        1e-5,
        sigma,
        clip,
        "rdp",
    )
    assert load_checkpoint(out / "checkpoint.pt")["accountant"]["accountant"] == {
        "mechanism": "rdp", "noise_multipliers": [sigma], "sample_rates": [q], "steps": [4],
    }  # fmt: skip

    exp = Experiment(cfg)
    clipped_some = False
    for r, meta in recorder.metas(exp).items():
        replies = {rep.client_id: rep.update for rep in recorder.replies[r]}
        assert sorted(replies) == cohorts[r]
        raw = [exp.client_update(meta, r, c).gradient for c in cohorts[r]]
        for c, u in zip(cohorts[r], raw):  # under client-central clients send their raw update
            for k in u:
                torch.testing.assert_close(replies[c][k], u[k], rtol=1e-4, atol=1e-6)
            clipped_some |= global_l2_norm(u) > clip
        total_clipped, _ = clipped_sum(raw, clip, reference=meta)
        noise = gaussian_noise(meta, sigma * clip, privacy_generator(NOISE_SEED, "noise", r))
        residual = []
        for k in meta:
            expected = (total_clipped[k] + noise[k]) / per_round
            torch.testing.assert_close(recorder.aggregates[r][k], expected, rtol=1e-4, atol=1e-6)
            residual.append((recorder.aggregates[r][k] * per_round - total_clipped[k]).flatten())
        # the noise on the sum has the calibrated size z C (321 parameters: SE of the std ~4%)
        assert float(torch.cat(residual).std()) == pytest.approx(sigma * clip, rel=0.2)
    assert clipped_some  # clipping was active, not a no-op
    _same_final_params_as_the_reference(cfg, out, tmp_path)


def test_client_local_replies_are_clipped_and_noised_by_each_client(tmp_path: Path) -> None:
    """Local DP: every reply is clip(u, C) + N(0, (z C)^2) drawn by the client; each client's own
    accountant lives in its node state across rounds (its reported epsilon grows)."""
    sigma, clip, total, per_round, rounds = 1.0, 0.3, 8, 3, 3
    cfg = dp_config(
        "client-local", rounds=rounds, total=total, per_round=per_round, noise_multiplier=sigma, clip_norm=clip
    )
    out, recorder = tmp_path / "sim", Recorder()
    summary = _simulate(cfg, out, recorder)

    exp = Experiment(cfg)
    seen: dict[int, int] = {}
    for r, meta in recorder.metas(exp).items():
        cohort = sample_clients(cfg.seed, r, total, per_round)
        replies = {rep.client_id: rep for rep in recorder.replies[r]}
        assert sorted(replies) == cohort
        for c in cohort:
            k = seen.get(c, 0)
            raw = exp.client_update(meta, r, c).gradient
            noise = gaussian_noise(raw, sigma * clip, privacy_generator(NOISE_SEED, "noise", r, c, k))
            denoised = {key: replies[c].update[key] - noise[key] for key in raw}
            assert global_l2_norm(denoised) <= clip * (1 + 1e-5)  # clipping bounds every update
            clipped, _ = clip_by_global_norm(raw, clip)
            for key in raw:
                torch.testing.assert_close(denoised[key], clipped[key], rtol=1e-4, atol=1e-6)
            # the client's own accountant: sensitivity 2C (z/2), q = 1, its participations so far
            assert replies[c].metrics["privacy.epsilon"] == pytest.approx(
                opacus_rdp_epsilon(sigma / 2, 1.0, k + 1), rel=1e-6
            )
            assert set(replies[c].metrics) == {"privacy.epsilon", "privacy.delta", "privacy.steps"}
            seen[c] = k + 1
        mean = {key: torch.stack([replies[c].update[key] for c in cohort]).mean(0) for key in meta}
        for key in meta:
            torch.testing.assert_close(recorder.aggregates[r][key], mean[key], rtol=1e-5, atol=1e-7)
    assert max(seen.values()) > 1  # some client took part twice: its state persisted between rounds
    rows = {r["round"]: r for r in read_metrics(out / "metrics.jsonl") if r["round"] > 0}
    counts: dict[int, int] = {}
    for r in range(1, rounds + 1):
        for c in sample_clients(cfg.seed, r, total, per_round):
            counts[c] = counts.get(c, 0) + 1
        assert rows[r]["privacy"]["epsilon"] == pytest.approx(
            opacus_rdp_epsilon(sigma / 2, 1.0, max(counts.values())), rel=1e-6
        )
    assert summary["privacy"]["clients_accounted"] == len(seen) and summary["privacy"]["sample_rate"] == 1.0
    assert sorted(p.name for p in (out / "client_privacy").iterdir()) == sorted(
        f"client-{c}.client-local.json" for c in seen
    )
    _same_final_params_as_the_reference(cfg, out, tmp_path)


def test_task_level_sites_account_their_own_epsilon_in_a_real_simulation(tmp_path: Path) -> None:
    """Task-level DP: each site runs Opacus' DP optimizer on Poisson samples of its own task pool
    and reports its epsilon, which matches Opacus for the site's sampling rate and steps."""
    sigma, clip, total, per_round, rounds = 1.1, 0.5, 6, 3, 3
    cfg = dp_config("task", rounds=rounds, total=total, per_round=per_round, noise_multiplier=sigma, clip_norm=clip)
    assert cfg.task.tasks_per_site == 12 and cfg.meta.tasks_per_client == 3
    q = 3 / 12
    out, recorder = tmp_path / "sim", Recorder()
    summary = _simulate(cfg, out, recorder)

    seen: dict[int, int] = {}
    rows = {r["round"]: r for r in read_metrics(out / "metrics.jsonl") if r["round"] > 0}
    for r in range(1, rounds + 1):
        cohort = sample_clients(cfg.seed, r, total, per_round)
        replies = {rep.client_id: rep for rep in recorder.replies[r]}
        assert sorted(replies) == cohort
        for c in cohort:
            seen[c] = seen.get(c, 0) + 1
            report = replies[c].metrics
            assert report["privacy.steps"] == seen[c]  # the site's accountant persisted in its node state
            assert report["privacy.epsilon"] == pytest.approx(opacus_rdp_epsilon(sigma, q, seen[c]), rel=1e-6)
            assert "privacy.sample_rate" not in report and replies[c].num_tasks == 3  # the nominal count
        assert rows[r]["privacy"]["epsilon"] == pytest.approx(
            max(opacus_rdp_epsilon(sigma, q, n) for n in seen.values()), rel=1e-6
        )
    assert max(seen.values()) > 1
    assert summary["privacy"]["unit"] == "task" and summary["privacy"]["sites_reporting"] == len(seen)
    _same_final_params_as_the_reference(cfg, out, tmp_path)


def test_noiseless_client_central_with_a_huge_clip_norm_equals_the_non_private_run(tmp_path: Path) -> None:
    """sigma = 0 and C = 1e9 in a real simulation: exactly the clipped (= raw) sum over the
    expected cohort, and the same model as the non-private reference (q = 1: everyone, every round)."""
    cfg = dp_config("client-central", rounds=2, total=4, per_round=4, noise_multiplier=0.0, clip_norm=1e9)
    out, recorder = tmp_path / "sim", Recorder()
    summary = _simulate(cfg, out, recorder)
    assert summary["privacy"]["epsilon"] is None and summary["privacy"]["epsilon_unbounded"] is True
    exp = Experiment(cfg)
    for r, meta in recorder.metas(exp).items():
        raw = [exp.client_update(meta, r, c).gradient for c in range(4)]
        for k in meta:
            torch.testing.assert_close(recorder.aggregates[r][k], sum(u[k] for u in raw) / 4, rtol=1e-4, atol=1e-6)
    plain = run_centralized(dp_config("none", rounds=2, total=4, per_round=4), tmp_path / "plain")
    a = load_checkpoint(out / "checkpoint.pt")["meta_params"]
    b = load_checkpoint(tmp_path / "plain" / "checkpoint.pt")["meta_params"]
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert summary["final"]["post_adapt_loss"] == pytest.approx(plain["final"]["post_adapt_loss"], rel=1e-4)
