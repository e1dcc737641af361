"""privacy.target_epsilon holds across a resume with changed settings, and is checked before every round.

The first part of each run spends epsilon at noise multiplier 0.8; the resumed part runs at 3.0.
A plan made from scratch at 3.0 would allow all rounds, but what is really spent is the
composition of both parts (Opacus' RDP accountant over the whole history).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.errors import BudgetExhausted, CheckpointError
from fedmeta.outputs import read_metrics
from fedmeta.privacy.accountant import PrivacyAccountant
from fedmeta.privacy.budget import plan_privacy
from fedmeta.privacy.facade import ServerPrivacy
from tests.privacy_helpers import dp_config

Q = 4 / 12  # dp_config's clients_per_round / clients_total
DELTA = 1e-5


def composed_epsilon(*parts: tuple[float, int]) -> float:
    """Opacus' RDP epsilon of ``(noise multiplier, rounds)`` parts run one after the other at ``Q``."""
    acc = PrivacyAccountant("rdp")
    for sigma, rounds in parts:
        for _ in range(rounds):
            acc.step(noise_multiplier=sigma, sample_rate=Q)
    return acc.get_epsilon(DELTA)


@pytest.fixture()
def first_part(tmp_path: Path) -> Path:
    run_centralized(dp_config("client-central", rounds=3, noise_multiplier=0.8), tmp_path)
    return tmp_path


def _target_fitting(rounds_at_3: int) -> float:
    """A target that 3 rounds at 0.8 and then ``rounds_at_3`` rounds at 3.0 fit, and one more does not."""
    fits, over = composed_epsilon((0.8, 3), (3.0, rounds_at_3)), composed_epsilon((0.8, 3), (3.0, rounds_at_3 + 1))
    assert fits < over
    return (fits + over) / 2


def test_a_resume_with_another_noise_multiplier_plans_on_top_of_what_the_checkpoint_spent(first_part: Path) -> None:
    target = _target_fitting(1)
    resumed = dp_config("client-central", rounds=6, noise_multiplier=3.0, target_epsilon=target, on_budget="stop")
    assert plan_privacy(resumed).within_budget  # from scratch, 6 rounds at 3.0 would fit
    summary = run_centralized(resumed, first_part, resume=True)
    assert summary["rounds_completed"] == 4 and summary["privacy"]["stopped_by_budget"] is True
    assert summary["privacy"]["rounds_allowed"] == 4
    assert summary["privacy"]["epsilon"] == pytest.approx(composed_epsilon((0.8, 3), (3.0, 1)), rel=1e-9)
    assert summary["privacy"]["epsilon"] <= target
    assert load_checkpoint(first_part / "checkpoint.pt")["round"] == 4
    assert [r["round"] for r in read_metrics(first_part / "metrics.jsonl") if "train" in r] == [1, 2, 3, 4]


def test_a_resume_that_would_exceed_the_target_is_refused_with_what_was_spent(first_part: Path) -> None:
    target = _target_fitting(1)
    resumed = dp_config("client-central", rounds=6, noise_multiplier=3.0, target_epsilon=target)
    with pytest.raises(BudgetExhausted, match=r"exceeded on resume: the checkpoint's 3 rounds have spent epsilon=.*"
                       r"only 4 rounds in all fit.*set federation.rounds to at most 4"):  # fmt: skip
        run_centralized(resumed, first_part, resume=True)
    assert load_checkpoint(first_part / "checkpoint.pt")["round"] == 3  # untouched


def test_every_round_is_checked_before_it_runs_even_when_the_plan_allowed_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A plan that missed something (here: one that allows every round) must not let a round past the target."""
    target = composed_epsilon((0.8, 2)) * 1.001
    monkeypatch.setattr(ServerPrivacy, "rounds_to_run", lambda self: self.cfg.federation.rounds)
    stop = dp_config("client-central", rounds=6, noise_multiplier=0.8, target_epsilon=target, on_budget="stop")
    summary = run_centralized(stop, tmp_path / "stop")
    assert summary["rounds_completed"] == 2 and summary["privacy"]["epsilon"] <= target
    assert summary["privacy"]["stopped_by_budget"] is True
    assert load_checkpoint(tmp_path / "stop" / "checkpoint.pt")["round"] == 2
    refuse = dp_config("client-central", rounds=6, noise_multiplier=0.8, target_epsilon=target)
    with pytest.raises(BudgetExhausted, match=r"round 3 would take the run to epsilon=.* nothing of round 3 was"):
        run_centralized(refuse, tmp_path / "refuse")
    written = json.loads((tmp_path / "refuse" / "summary.json").read_text())
    assert written["rounds_completed"] == 2 == load_checkpoint(tmp_path / "refuse" / "checkpoint.pt")["round"]
    assert written["privacy"]["epsilon"] <= target


@pytest.mark.parametrize("mode", ["client-local", "task"])
def test_the_budget_holder_of_the_client_and_site_modes_survives_a_resume(mode: str, tmp_path: Path) -> None:
    """A client or site that takes part in every round: its history is checkpointed, so a resume at
    another noise multiplier is planned on top of it, as in client-central."""
    first: dict[str, Any] = {"noise_multiplier": 0.8}
    run_centralized(dp_config(mode, rounds=2, **first), tmp_path)
    state = load_checkpoint(tmp_path / "checkpoint.pt")["accountant"]["budget_holder"]
    params = plan_privacy(dp_config(mode, rounds=2, **first))
    assert state["noise_multipliers"] == [params.accounted_noise_multiplier]
    assert state["sample_rates"] == [params.sample_rate] and sum(state["steps"]) == params.steps
    resumed = dp_config(mode, rounds=4, noise_multiplier=3.0, target_epsilon=1e9)
    holder = ServerPrivacy(resumed)
    holder.load_state_dict(load_checkpoint(tmp_path / "checkpoint.pt")["accountant"])
    plan = plan_privacy(resumed, history=holder.spent_history(), rounds_done=2)
    fresh = plan_privacy(dp_config(mode, rounds=4, noise_multiplier=3.0))
    assert plan.spent_epsilon == pytest.approx(params.epsilon, rel=1e-9)
    assert plan.epsilon is not None and fresh.epsilon is not None and plan.epsilon > fresh.epsilon


def test_a_resume_with_another_accountant_is_refused_naming_the_key(first_part: Path) -> None:
    other = dp_config("client-central", rounds=6, noise_multiplier=0.8, accountant="gdp")
    with pytest.raises(CheckpointError, match=r"privacy.accountant 'rdp', this run has 'gdp'.*resume with"):
        run_centralized(other, first_part, resume=True)
    with pytest.raises(CheckpointError, match=r"privacy.mode 'client-central', this run has 'client-local'"):
        run_centralized(dp_config("client-local", rounds=6), first_part, resume=True)
