"""The progress bar counts the client updates it has seen and shows their rate."""

from __future__ import annotations

from fedmeta.cli.common import Progress


def test_progress_counts_client_updates_and_shows_their_rate() -> None:
    bar = Progress(3, enabled=False)
    try:
        first = bar.postfix({"replies": 5, "train": {"query_loss_post": 0.5}})
        second = bar.postfix({"replies": 4, "train": {"query_loss_post": 0.4}, "eval": {"post_adapt_loss": 0.3}})
        third = bar.postfix({"train": {}})  # a row without replies adds none
        assert bar.updates == 9
        assert set(first) == {"upd/s", "train"} and float(first["upd/s"]) > 0
        assert second["train"] == "0.400" and second["heldout"] == "0.300"
        assert set(third) == {"upd/s"}
        bar(4, {"replies": 1, "privacy": {"epsilon": 1.5}})  # the call itself also counts
        assert bar.updates == 10
    finally:
        bar.close()
