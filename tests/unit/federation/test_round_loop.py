"""RoundLoop over the in-process transport: what the reference logs is what the Flower server would."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint, save_checkpoint
from fedmeta.config import Config, load_config
from fedmeta.errors import CheckpointError
from fedmeta.experiment import Experiment
from fedmeta.federation import RoundLoop, train_on_client
from fedmeta.outputs import read_metrics
from fedmeta.privacy.facade import ServerPrivacy


@pytest.fixture(scope="module")
def cfg(repo_root: Path) -> Config:
    return load_config(
        repo_root / "configs" / "sinusoid.yaml",
        ["federation.clients_total=12", "federation.clients_per_round=4", "meta.tasks_per_client=3",
         "federation.rounds=2", "eval.tasks=10", "eval.every=2"],
    )


def test_reference_train_metrics_are_the_task_weighted_means_the_clients_would_send(
    cfg: Config, tmp_path: Path
) -> None:
    """The in-process transport files one reply per client (its slice of the vectorized pass);
    the loop averages them as it averages Flower replies. That equals each client's own
    ``train_on_client`` metrics averaged over tasks, and the pooled float32 mean of all tasks up
    to float32 rounding (the sum order differs: 1e-6 relative bounds it)."""
    run_centralized(cfg, tmp_path)
    row = next(r for r in read_metrics(tmp_path / "metrics.jsonl") if r["round"] == 1)
    exp = Experiment(cfg)
    meta = exp.initial_meta_params()
    clients = exp.sample_round(1)
    alone = [train_on_client(exp, meta, 1, c) for c in clients]
    total = sum(u.num_tasks for u in alone)
    pooled = exp.round_updates(meta, 1, clients)
    assert row["tasks"] == total == int(pooled.weights.sum())
    for key, value in row["train"].items():
        expected = sum(u.metrics[key] * u.num_tasks for u in alone) / total
        assert value == pytest.approx(expected, rel=1e-6), key
        assert value == pytest.approx(pooled.metrics[key], rel=1e-6), key
    for i, own in enumerate(alone):  # each client's share of the vectorized pass is what it computes alone
        assert pooled.client_metrics[i] == pytest.approx(own.metrics, rel=1e-5)
        for k, v in own.gradient.items():
            torch.testing.assert_close(pooled.updates[k][i], v, rtol=1e-5, atol=1e-7)


def test_a_dp_run_refuses_a_checkpoint_without_privacy_state(repo_root: Path, tmp_path: Path) -> None:
    dp = load_config(
        repo_root / "configs" / "sinusoid.yaml",
        ["privacy.mode=client-local", "privacy.noise_seed=7", "federation.rounds=3", "eval.tasks=10", "eval.every=3"],
    )
    exp = Experiment(dp)
    meta = exp.initial_meta_params()
    from fedmeta.config import to_dict

    save_checkpoint(
        tmp_path / "checkpoint.pt", meta_params=meta, round_idx=1, config=to_dict(dp),
        model=exp.model.describe(), task_kind=exp.kind, optimizer=None, accountant=None,
    )  # fmt: skip
    assert ServerPrivacy(dp).state_dict()  # the policy keeps state, so its absence is an error
    with pytest.raises(CheckpointError, match="holds no privacy state"):
        RoundLoop(dp, tmp_path, resume=True, experiment=exp)


def test_checkpoint_carries_the_in_process_clients_accountants(repo_root: Path, tmp_path: Path) -> None:
    dp = load_config(
        repo_root / "configs" / "sinusoid.yaml",
        ["privacy.mode=client-local", "privacy.noise_seed=7", "federation.clients_total=6",
         "federation.clients_per_round=3", "federation.rounds=2", "eval.tasks=10", "eval.every=2"],
    )
    run_centralized(dp, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    saved = state["extra"]["client_privacy"]
    assert saved["clients"] == sorted(saved["clients"]) and len(saved["clients"]) == len(saved["states"]) >= 3
    assert state["extra"]["mode"] == "centralized" and "totals" in state["extra"]
    assert torch.is_tensor(next(iter(state["meta_params"].values())))


def test_a_dp_checkpoint_is_not_resumed_without_dp_and_flower_refuses_in_process_accountants(
    repo_root: Path, tmp_path: Path
) -> None:
    """Resuming must never drop privacy state: a run without DP would lose the accountant, and a
    Flower run would restart the in-process clients' accountants at zero."""
    dp = load_config(
        repo_root / "configs" / "sinusoid.yaml",
        ["privacy.mode=client-local", "privacy.noise_seed=7", "federation.clients_total=6",
         "federation.clients_per_round=3", "federation.rounds=2", "eval.tasks=10", "eval.every=2"],
    )
    run_centralized(dp, tmp_path)
    plain = load_config(
        repo_root / "configs" / "sinusoid.yaml",
        ["federation.clients_total=6", "federation.clients_per_round=3", "federation.rounds=3", "eval.tasks=10"],
    )
    with pytest.raises(CheckpointError, match="holds privacy state"):
        RoundLoop(plain, tmp_path, resume=True)
    from fedmeta.flower.transport import FlowerTransport

    extra = load_checkpoint(tmp_path / "checkpoint.pt")["extra"]
    with pytest.raises(CheckpointError, match="resume it with fedmeta centralized"):
        FlowerTransport(None).load_state_dict(extra)  # type: ignore[arg-type]


def test_a_resume_with_another_outer_optimizer_is_refused_naming_the_key(cfg: Config, tmp_path: Path) -> None:
    run_centralized(cfg, tmp_path)
    assert cfg.meta.outer_optimizer == "adam"
    from dataclasses import replace

    sgd = replace(cfg, meta=replace(cfg.meta, outer_optimizer="sgd"), federation=replace(cfg.federation, rounds=3))
    with pytest.raises(CheckpointError, match=r"meta.outer_optimizer 'adam', this run has 'sgd'"):
        RoundLoop(sgd, tmp_path, resume=True)


def test_centralized_refuses_a_flower_checkpoint_whose_clients_keep_their_own_accountants(
    repo_root: Path, tmp_path: Path
) -> None:
    """A checkpoint written by ``fedmeta simulate`` or a deployment under client-local (or task) DP holds
    no accountants of in-process clients: the Flower sites keep their own. Resuming it with
    ``fedmeta centralized`` must not restart every client's accountant at zero."""
    dp = load_config(
        repo_root / "configs" / "sinusoid.yaml",
        ["privacy.mode=client-local", "privacy.noise_seed=7", "federation.clients_total=6",
         "federation.clients_per_round=3", "federation.rounds=2", "eval.tasks=10", "eval.every=2"],
    )  # fmt: skip
    run_centralized(dp, tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")
    state["extra"].pop("client_privacy")
    state["extra"]["mode"] = "simulation"  # what the Flower server writes: its transport keeps no client state
    save_checkpoint(
        tmp_path / "checkpoint.pt", meta_params=state["meta_params"], round_idx=state["round"], config=state["config"],
        model=state["model"], task_kind=state["task_kind"], optimizer=state["optimizer"],
        accountant=state["accountant"], extra=state["extra"],
    )  # fmt: skip
    from dataclasses import replace

    longer = replace(dp, federation=replace(dp.federation, rounds=3))
    with pytest.raises(CheckpointError, match=r"mode 'simulation' whose clients keep their own privacy accountants"):
        run_centralized(longer, tmp_path, resume=True)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["round"] == 2
