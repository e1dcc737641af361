"""``privacy.mode: client-distributed`` in a real Flower simulation: SecAgg+ from our ServerApp.

One simulation of 2 rounds with 4 clients (``t = 3``), client 3 dropping out of round 2 (its node
raises on every SecAgg+ message of that round: a dropout above the threshold). Every message the
server pulls is captured, and none may carry an individual update (SecAgg+'s masked vectors are
integers modulo ``M``; the legacy ``FitRes`` arrays are cleared by ``secaggplus_mod``). Epsilon is
Opacus' at ``sigma sqrt(n / t)`` for the survivors of each round, and the final parameters equal
the centralized reference's with the same dropout (the same noisy updates, quantized) within the
stated quantization error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmeta.checkpoint import load_checkpoint
from fedmeta.outputs import read_metrics
from tests.privacy_helpers import dp_config, opacus_rdp_epsilon

pytestmark = pytest.mark.slow


@dataclass(frozen=True)
class DropOut:
    """A Flower mod: client ``client`` raises on every train message of round ``round_idx`` (all SecAgg+ stages)."""

    client: int
    round_idx: int

    def __call__(self, message: Any, context: Any, call_next: Any) -> Any:
        if (
            message.metadata.message_type == "train"
            and int(context.node_config["partition-id"]) == self.client
            and message.metadata.group_id == str(self.round_idx)
        ):
            raise RuntimeError(f"client {self.client} drops out of round {self.round_idx}")
        return call_next(message, context)


def test_secagg_simulation_hides_updates_and_matches_the_reference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedmeta.flower import secagg
    from fedmeta.flower.simulation import simulate

    received: list[Any] = []
    original = secagg._ExchangeGrid.send_and_receive

    def capture(self: Any, messages: Any, *, timeout: float | None = None) -> list[Any]:
        replies = original(self, messages, timeout=timeout)
        received.extend(replies)
        return replies

    monkeypatch.setattr(secagg._ExchangeGrid, "send_and_receive", capture)
    cfg = dp_config("client-distributed", rounds=2, total=4, per_round=4, min_survivors=3)
    summary = simulate(cfg, tmp_path / "sim", num_cpus=2, client_mods=[DropOut(3, 2)])
    assert summary["rounds_completed"] == 2 and summary["privacy"]["min_survivors"] == 3

    # no message the server received holds a float array or a metric: only keys, shares and masked integers
    assert received
    for msg in received:
        if msg.has_error():  # the dropped-out client's error replies
            continue
        for record in msg.content.array_records.values():
            assert len(record) == 0
        for record in msg.content.metric_records.values():
            assert dict(record) == {"num_examples": 1}  # the fixed weight, never a client's count
        for name, record in msg.content.config_records.items():
            for key, value in record.items():
                assert not isinstance(value, float), (name, key)
    from flwr.common.secure_aggregation.secaggplus_constants import Key

    masked = [m for m in received if not m.has_error() and any(Key.MASKED_PARAMETERS in rec for rec in
                                                               m.content.config_records.values())]  # fmt: skip
    assert len(masked) == 4 + 3  # the masked vectors did arrive: as integers modulo M, in bytes
    rows = [r for r in read_metrics(tmp_path / "sim" / "metrics.jsonl") if "privacy" in r]
    assert [row["privacy"]["survivors"] for row in rows] == [4, 3] and rows[1]["failed"] == 1
    from opacus.accountants import RDPAccountant

    acc = RDPAccountant()
    for row, n in zip(rows, (4, 3)):
        p = row["privacy"]
        assert p["clipped_coordinates"] == 0 and "sum_check" not in p
        assert p["accounted_noise_multiplier"] == pytest.approx(1.2 * np.sqrt(n / 3))
        acc.step(noise_multiplier=1.2 * np.sqrt(n / 3), sample_rate=1.0)
        assert p["epsilon"] == pytest.approx(acc.get_epsilon(delta=1e-5), rel=1e-6)
    assert rows[0]["privacy"]["epsilon"] == pytest.approx(opacus_rdp_epsilon(1.2 * np.sqrt(4 / 3), 1.0, 1), rel=1e-6)
    bound = rows[0]["privacy"]["quantization_error_bound"]

    from fedmeta.federation import InProcessTransport, RoundLoop

    RoundLoop(cfg, tmp_path / "ref", mode="centralized").run(InProcessTransport(drop_out=lambda r, c: (r, c) == (2, 3)))
    a = load_checkpoint(tmp_path / "sim" / "checkpoint.pt")["meta_params"]
    b = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["meta_params"]
    # two SGD steps of lr 0.05 on means over 4 of sums whose coordinates differ by at most the bound
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=2 * 0.05 * bound / 4 * 1.01 + 1e-6)
