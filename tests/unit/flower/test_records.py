"""The Flower records adapter: records round-trip exactly, replies decode or are refused."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.app.metadata import Metadata

from fedmeta.algorithms import MetaUpdate
from fedmeta.config import load_config
from fedmeta.errors import UpdateRejected
from fedmeta.experiment import Experiment
from fedmeta.federation import ClientIdentity
from fedmeta.flower import records as fl


def _reply(content: RecordDict, src: int = 7) -> Message:
    meta = Metadata(
        run_id=1, message_id="m", src_node_id=src, dst_node_id=0, reply_to_message_id="x",
        group_id="1", created_at=0.0, ttl=60.0, message_type="train",
    )
    return Message(metadata=meta, content=content)


@pytest.fixture(scope="module")
def metasgd_params(repo_root: Path) -> dict[str, torch.Tensor]:
    cfg = load_config(repo_root / "configs" / "sinusoid.yaml", ["meta.algorithm=metasgd"])
    return Experiment(cfg).initial_meta_params()


def test_params_round_trip_is_exact_including_metasgd_rates(metasgd_params: dict[str, torch.Tensor]) -> None:
    assert any(k.startswith("lr.") for k in metasgd_params)
    back = fl.record_to_params(fl.params_to_record(metasgd_params))
    assert list(back) == list(metasgd_params)
    for key, value in metasgd_params.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape
        assert torch.equal(back[key], value)


def test_params_round_trip_keeps_float64_and_scalars() -> None:
    params = {"w": torch.randn(3, 2, dtype=torch.float64), "s": torch.tensor(1.5, dtype=torch.float64)}
    back = fl.record_to_params(fl.params_to_record(params))
    assert back["w"].dtype == torch.float64 and torch.equal(back["w"], params["w"])
    assert back["s"].shape == () and float(back["s"]) == 1.5


def test_update_reply_round_trip(metasgd_params: dict[str, torch.Tensor]) -> None:
    update = MetaUpdate(gradient=metasgd_params, num_tasks=4, metrics={"query_loss_post": 0.25, "query_loss_pre": 1.5})
    content = fl.pack_update(update, {"compute-seconds": 0.1})
    grad, tasks, metrics = fl.unpack_update(_reply(content))
    assert tasks == 4
    assert metrics == {"query_loss_post": 0.25, "query_loss_pre": 1.5, "compute-seconds": pytest.approx(0.1)}
    assert all(torch.equal(grad[k], metasgd_params[k]) for k in metasgd_params)
    assert fl.record_nbytes(content) > sum(v.numel() * 4 for v in metasgd_params.values())


def test_reply_without_tasks_or_records_is_refused(metasgd_params: dict[str, torch.Tensor]) -> None:
    update = MetaUpdate(gradient=metasgd_params, num_tasks=0, metrics={})
    with pytest.raises(UpdateRejected, match="tasks"):
        fl.unpack_update(_reply(fl.pack_update(update)))
    with pytest.raises(UpdateRejected, match="lacks the record"):
        fl.unpack_update(_reply(RecordDict()))


def test_identity_and_instructions_round_trip(metasgd_params: dict[str, torch.Tensor]) -> None:
    ident = ClientIdentity(
        client_id=12, kind="classification", num_tasks=30, site="site-0012", input_shape=(1, 28, 28), output_dim=5
    )
    assert fl.unpack_identity(_reply(fl.pack_identity(ident))) == ident
    meta, config = fl.unpack_instructions(_reply(fl.pack_instructions(metasgd_params, {"round": 3, "client-id": 12})))
    assert config == {"round": 3, "client-id": 12}
    assert all(torch.equal(meta[k], metasgd_params[k]) for k in metasgd_params)


def test_eval_metrics_reply_refuses_non_finite() -> None:
    metrics, n = fl.unpack_eval_metrics(_reply(fl.pack_eval_metrics({"post_adapt_loss": 0.5}, 3)))
    assert metrics == {"post_adapt_loss": 0.5} and n == 3
    with pytest.raises(UpdateRejected):
        fl.unpack_eval_metrics(_reply(fl.pack_eval_metrics({"post_adapt_loss": math.nan}, 3)))
