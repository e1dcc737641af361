"""Server-side bookkeeping and math of fedmeta.federated, without Flower."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from fedmeta.centralized import run_centralized
from fedmeta.config import Config, load_config
from fedmeta.errors import InconsistentReplies, UpdateRejected
from fedmeta.experiment import Experiment
from fedmeta.federation import (
    ClientDirectory,
    ClientIdentity,
    ClientReply,
    RoundLoop,
    combine_eval_metrics,
    describe_client,
    eval_cohort,
    evaluate_on_client,
    resolve_client_id,
    train_on_client,
)
from fedmeta.local_update import local_meta_update


@pytest.fixture(scope="module")
def small_cfg(repo_root: Path) -> Config:
    return load_config(
        repo_root / "configs" / "sinusoid.yaml",
        [
            "federation.clients_total=20",
            "federation.clients_per_round=4",
            "federation.rounds=3",
            "eval.tasks=20",
            "eval.every=2",
            "eval.steps=2",
        ],
    )


def _ident(cid: int, kind: str = "regression", site: str = "") -> ClientIdentity:
    return ClientIdentity(client_id=cid, kind=kind, num_tasks=0, site=site, input_shape=(1,), output_dim=1)


def test_directory_maps_ids_refuses_mismatches_and_assigns_free_ids() -> None:
    d = ClientDirectory(5, kind="regression", input_shape=(1,), output_dim=1)
    assert d.register(101, _ident(0)) is None
    assert d.register(102, _ident(3)) is None
    assert "classification" in (d.register(103, _ident(1, kind="classification")) or "")
    assert "outside" in (d.register(104, _ident(9)) or "")
    assert "shape" in (d.register(105, ClientIdentity(2, "regression", 0, "", (2,), 1)) or "")
    d.register(107, _ident(-1, site="b"))
    d.register(106, _ident(-1, site="a"))
    assert d.assign_missing() == [(1, 106), (2, 107)]  # free ids in order of site name
    found, missing = d.locate([0, 1, 2, 3, 4])
    assert found == {0: 101, 1: 106, 2: 107, 3: 102} and missing == [4]
    d.register(108, _ident(3))  # client 3 came back on a new node
    assert d.locate([3])[0] == {3: 108} and d.client_of(102) is None
    d.forget({101})
    assert d.locate([0])[1] == [0]
    assert d.known_nodes == {103, 104, 105, 106, 107, 108}


def test_resolve_client_id() -> None:
    assert resolve_client_id(4, 4) == 4
    assert resolve_client_id(None, 6) == 6
    assert resolve_client_id(4, None) == 4
    with pytest.raises(UpdateRejected, match="addressed client 5"):
        resolve_client_id(4, 5)
    with pytest.raises(UpdateRejected, match="no client id"):
        resolve_client_id(None, None)


def test_client_functions_match_the_reference(small_cfg: Config) -> None:
    exp = Experiment(small_cfg)
    meta = exp.initial_meta_params()
    upd = train_on_client(exp, meta, 2, 7)
    ref = exp.client_update(meta, 2, 7)
    assert all(torch.equal(upd.gradient[k], ref.gradient[k]) for k in meta)
    ident = describe_client(exp, 7, None)
    assert (ident.client_id, ident.kind, ident.input_shape, ident.output_dim) == (7, "regression", (1,), 1)
    with pytest.raises(UpdateRejected, match="do not fit"):
        train_on_client(exp, {k: v[..., :1] if v.ndim else v for k, v in meta.items()}, 2, 7)
    metrics, n = evaluate_on_client(exp, meta, 3, num_tasks=5)
    again, _ = evaluate_on_client(exp, meta, 3, num_tasks=5)
    assert n == 5 and metrics == again  # a client's held-out tasks are fixed
    assert metrics["post_adapt_loss_sq"] >= metrics["post_adapt_loss"] ** 2


def test_combine_eval_metrics_equals_pooled_statistics() -> None:
    a = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64)
    b = torch.tensor([5.0, 7.0], dtype=torch.float64)
    parts = [
        ({"post_adapt_loss": float(x.mean()), "post_adapt_loss_sq": float((x**2).mean())}, x.numel()) for x in (a, b)
    ]
    out = combine_eval_metrics(parts)
    both = torch.cat([a, b])
    assert out["tasks"] == 5 and out["clients"] == 2
    assert out["post_adapt_loss"] == pytest.approx(float(both.mean()))
    assert out["post_adapt_loss_ci95"] == pytest.approx(1.96 * float(both.std()) / math.sqrt(5))


def test_eval_cohort_is_seeded(small_cfg: Config) -> None:
    from dataclasses import replace

    cfg = replace(small_cfg, eval=replace(small_cfg.eval, clients=3))
    assert eval_cohort(cfg, 4) == eval_cohort(cfg, 4) and len(eval_cohort(cfg, 4)) == 3
    assert eval_cohort(small_cfg, 4) == []


def test_local_meta_update_is_sgd_on_meta_gradients(small_cfg: Config) -> None:
    exp = Experiment(small_cfg)
    meta = exp.initial_meta_params()
    batches = [exp.source.client_tasks(1, 2, step=s) for s in range(3)]
    one = local_meta_update(exp.algorithm, meta, batches[:1], lr=0.1)
    assert all(torch.equal(one.gradient[k], exp.algorithm.meta_gradient(meta, batches[0]).gradient[k]) for k in meta)
    out = local_meta_update(exp.algorithm, meta, batches, lr=0.1)
    theta = dict(meta)
    for b in batches:
        g = exp.algorithm.meta_gradient(theta, b).gradient
        theta = {k: theta[k] - 0.1 * g[k] for k in theta}
    for k in meta:
        torch.testing.assert_close(out.gradient[k], (meta[k] - theta[k]) / 0.1, rtol=1e-3, atol=1e-4)
    assert out.num_tasks == 3 * small_cfg.meta.tasks_per_client


def _replies(server: RoundLoop, round_idx: int, clients: list[int]) -> list[ClientReply]:
    out = []
    for c in clients:
        u = server.exp.client_update(server.meta, round_idx, c)
        out.append(ClientReply(c, u.gradient, u.num_tasks, u.metrics, nbytes=100))
    return out


def test_server_rounds_match_centralized_and_reject_bad_updates(small_cfg: Config, tmp_path: Path) -> None:
    server = RoundLoop(small_cfg, tmp_path / "fed")
    server.start()
    for _ in range(small_cfg.federation.rounds):
        book = server.begin_round()
        replies = _replies(server, book.round_idx, book.sampled)
        nan = {k: v.clone() for k, v in replies[0].update.items()}
        next(iter(nan.values())).view(-1)[0] = math.nan
        assert not server.accept(book, ClientReply(book.sampled[0], nan, 1, {}))
        wrong = {k: v[..., :1] if v.ndim else v for k, v in replies[1].update.items()}
        assert not server.accept(book, ClientReply(book.sampled[1], wrong, 1, {}))
        assert not server.accept(book, ClientReply(999, replies[2].update, 1, {}))
        for r in replies:
            assert server.accept(book, r)  # a valid retry replaces the rejection
        row = server.complete_round(book)
        assert row["replies"] == len(book.sampled) and row["bytes"]["down_per_client"] == 0
    summary = server.finish()
    reference = run_centralized(small_cfg, tmp_path / "cen")
    for key in ("pre_adapt_loss", "post_adapt_loss"):
        assert summary["final"][key] == pytest.approx(reference["final"][key], rel=1e-5)
    rows = [json.loads(x) for x in (tmp_path / "fed" / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows if "eval" in r] == [0, 2, 3]


def test_too_few_replies_raise_and_keep_the_last_checkpoint(small_cfg: Config, tmp_path: Path) -> None:
    server = RoundLoop(small_cfg, tmp_path)
    book = server.begin_round()
    for r in _replies(server, 1, book.sampled):
        server.accept(book, r)
    server.complete_round(book)
    book = server.begin_round()
    server.accept(book, _replies(server, 2, book.sampled[:1])[0])
    for c in book.sampled[1:]:
        server.fail(book, c, "boom")
    with pytest.raises(InconsistentReplies, match="round 2: only 1 valid replies.*holds round 1"):
        server.complete_round(book)
    resumed = RoundLoop(small_cfg, tmp_path, resume=True)
    assert resumed.round == 1
    assert all(torch.equal(resumed.meta[k], server.meta[k]) for k in server.meta)
    assert resumed.optimizer.state_dict()["state"][0]["step"] == server.optimizer.state_dict()["state"][0]["step"]


def test_a_site_folder_describes_itself(small_cfg: Config, tmp_path: Path) -> None:
    from dataclasses import replace

    from fedmeta.datagen import make_sites

    make_sites(small_cfg, 2, tmp_path, tasks_per_site=6, heldout_per_site=2)
    site = tmp_path / "site-0001"
    cfg = replace(small_cfg, task=replace(small_cfg.task, name="folder", data_dir=str(tmp_path)))
    exp = Experiment(cfg, data_dir=str(site))
    ident = describe_client(exp, None, str(site))
    assert (ident.client_id, ident.kind, ident.num_tasks, ident.site) == (-1, "regression", 6, "site-0001")
    metrics, n = evaluate_on_client(exp, exp.initial_meta_params(), 5, num_tasks=4)
    assert n == 4 and metrics["post_adapt_loss"] > 0  # from the site's heldout/ folder


def test_a_claimed_task_count_is_capped_and_a_non_positive_one_refused(small_cfg: Config, tmp_path: Path) -> None:
    # issue 15, finding 7: the weighted mean trusted the claimed count, so one client claiming 10^9
    # tasks set the aggregate alone
    server = RoundLoop(small_cfg, tmp_path)
    book = server.begin_round()
    replies = _replies(server, 1, book.sampled)
    honest = replies[0].num_tasks
    assert honest == small_cfg.meta.tasks_per_client
    liar = replies[1]
    huge = {k: v * 1e3 for k, v in liar.update.items()}
    assert server.accept(book, ClientReply(liar.client_id, huge, 10**9, liar.metrics))
    assert book.replies[liar.client_id].num_tasks == honest  # weight capped at meta.tasks_per_client
    assert not server.accept(book, ClientReply(replies[2].client_id, replies[2].update, 0, {}))
    assert "task count 0" in book.rejected[replies[2].client_id]
    assert server.accept(book, replies[2])
    for r in replies[3:] + replies[:1]:
        assert server.accept(book, r)
    row = server.complete_round(book)
    assert row["tasks"] == honest * len(replies)
