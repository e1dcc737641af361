"""``privacy.mode: client-distributed`` in a real Flower simulation: SecAgg+ from our ServerApp.

One simulation of 2 rounds with 4 clients (``t = 3``): every message the server pulls is
captured, and none may carry an individual update (SecAgg+'s masked vectors are integers modulo
``M``; the legacy ``FitRes`` arrays are cleared by ``secaggplus_mod``). The sum the loop receives
equals the in-process reference's (the same noisy updates, quantized) within the stated
quantization error, epsilon is Opacus' at ``sigma sqrt(n / t)``, and the final parameters equal
the centralized reference's within that error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.checkpoint import load_checkpoint
from fedmeta.outputs import read_metrics
from tests.privacy_helpers import dp_config, opacus_rdp_epsilon

pytestmark = pytest.mark.slow


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
    summary = simulate(cfg, tmp_path / "sim", num_cpus=2)
    assert summary["rounds_completed"] == 2 and summary["privacy"]["min_survivors"] == 3

    # no message the server received holds a float array or a metric: only keys, shares and masked integers
    assert received
    for msg in received:
        assert not msg.has_error()
        for record in msg.content.array_records.values():
            assert len(record) == 0
        for record in msg.content.metric_records.values():
            assert dict(record) == {"num_examples": 1}  # the fixed weight, never a client's count
        for name, record in msg.content.config_records.items():
            for key, value in record.items():
                assert not isinstance(value, float), (name, key)
    rows = [r for r in read_metrics(tmp_path / "sim" / "metrics.jsonl") if "privacy" in r]
    for r, row in enumerate(rows, start=1):
        p = row["privacy"]
        assert p["survivors"] == 4 and p["clipped_coordinates"] == 0 and "sum_check" not in p
        assert p["accounted_noise_multiplier"] == pytest.approx(1.2 * np.sqrt(4 / 3))
        assert p["epsilon"] == pytest.approx(opacus_rdp_epsilon(1.2 * np.sqrt(4 / 3), 1.0, r), rel=1e-6)
        bound = p["quantization_error_bound"]

    run_centralized(cfg, tmp_path / "ref")
    a = load_checkpoint(tmp_path / "sim" / "checkpoint.pt")["meta_params"]
    b = load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["meta_params"]
    # two SGD steps of lr 0.05 on means over 4 of sums whose coordinates differ by at most the bound
    for k, v in b.items():
        torch.testing.assert_close(a[k], v, rtol=0, atol=2 * 0.05 * bound / 4 * 1.01 + 1e-6)
