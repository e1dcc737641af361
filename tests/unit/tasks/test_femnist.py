"""The femnist family: LEAF JSON files with a few writers, written by the test.

Every sample's pixels encode who wrote it: pixel 0 holds the writer, pixel 1 the class (LEAF's
dark ink on white paper, 1.0 elsewhere), so an episode shows where each image came from.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmeta.config import Config, config_from_dict
from fedmeta.errors import ConfigError, DataFormatError
from fedmeta.rng import make_generator
from fedmeta.tasks import TaskSource, build_family
from fedmeta.tasks.femnist import FemnistFamily, read_leaf

WRITERS = ["f0003_00", "f0001_07", "f0002_11", "f0000_42", "f0004_19"]  # sorted: f0000_42 is writer 0


def _user(writer: int, counts: dict[int, int]) -> dict[str, list]:
    xs, ys = [], []
    for cls, n in counts.items():
        for _ in range(n):
            x = np.ones(784)
            x[0], x[1] = 1 - writer / 10, 1 - cls / 100
            xs.append(x.tolist())
            ys.append(cls)
    return {"x": xs, "y": ys}


def _write(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(range(6), 3)
    for part, names in enumerate((WRITERS[:3], WRITERS[3:])):
        data = {}
        for name in names:
            w = sorted(WRITERS).index(name)
            data[name] = _user(w, {**counts, 5: 1} if w == 1 else counts)
        doc = {"users": names, "num_samples": [len(data[n]["y"]) for n in names], "user_data": data}
        (folder / f"all_data_{part}.json").write_text(json.dumps(doc))
    return folder


def _cfg(folder: Path, clients: int = 4, **task: object) -> Config:
    return config_from_dict(
        {
            "seed": 0,
            "task": {"name": "femnist", "data_dir": str(folder), "ways": 3, "shots": 1, "query": 2, **task},
            "model": {"name": "conv4", "channels": 8},
            "federation": {"clients_total": clients, "clients_per_round": 1},
        }
    )


def _origin(images: torch.Tensor) -> tuple[set[int], list[int]]:
    """Writers and classes encoded in images ``[N, 1, 28, 28]`` (inverted: 1 - x)."""
    writers = {round(float(v) * 10) for v in images[:, 0, 0, 0]}
    classes = [round(float(v) * 100) for v in images[:, 0, 0, 1]]
    return writers, classes


def test_writers_are_read_sorted_and_inverted(tmp_path: Path) -> None:
    data = read_leaf(_write(tmp_path / "leaf"))
    assert data.names == tuple(sorted(WRITERS))
    assert data.images[2].shape == (18, 28, 28) and data.images[1].shape == (16, 28, 28)
    assert float(data.images[2][0, 0, 0]) == pytest.approx(0.2) and float(data.images[2][0, 5, 5]) == 0.0


def test_each_client_draws_from_its_own_writer_and_eval_from_held_out_ones(tmp_path: Path) -> None:
    source = TaskSource(_cfg(_write(tmp_path / "leaf")))
    for client in range(4):
        batch = source.client_tasks(0, client)
        assert batch.support_x.shape == (batch.num_tasks, 3, 1, 28, 28) and batch.query_x.shape[1] == 6
        assert batch.support_y[0].tolist() == [0, 1, 2] and batch.query_y[0].tolist() == [0, 0, 1, 1, 2, 2]
        writers, _ = _origin(torch.cat([batch.support_x, batch.query_x], 1).flatten(0, 1))
        assert writers == {client}
    ev = source.eval_tasks(20)
    writers, _ = _origin(ev.query_x.flatten(0, 1))
    assert writers == {4}  # the last writer by id is the held-out tenth
    # support and query labels name the same classes; a class with too few samples never appears
    for t in range(ev.num_tasks):
        _, sup = _origin(ev.support_x[t])
        _, qry = _origin(ev.query_x[t])
        assert [sup[y] for y in ev.query_y[t].tolist()] == qry
    one = source.family(1)
    assert isinstance(one, FemnistFamily)
    seen = set()
    for r in range(20):
        _, classes = _origin(source.client_tasks(r, 1).support_x.flatten(0, 1))
        seen |= set(classes)
    assert seen == {0, 1, 2, 3, 4}  # writer 1 has a single sample of class 5: not enough for 1 + 2


def test_resized_images_and_explicit_heldout_writers(tmp_path: Path) -> None:
    folder = _write(tmp_path / "leaf")
    fam = build_family(_cfg(folder, clients=2, image_size=32, heldout_writers=3))
    batch = fam.sample(make_generator(0, "t"), 2, "eval")
    assert batch.query_x.shape == (2, 6, 1, 32, 32)
    assert int(batch.params[:, 0].min()) >= 2  # writers 2, 3, 4 held out


def test_more_clients_than_writers_is_refused_naming_the_keys_and_folder(tmp_path: Path) -> None:
    folder = _write(tmp_path / "leaf")
    with pytest.raises(ConfigError, match=rf"'federation.clients_total' \(5\) exceeds the 4 writers of '{folder}'"):
        build_family(_cfg(folder, clients=5))
    with pytest.raises(ConfigError, match=r"'task.heldout_writers' \(5\) holds out 5 of the 5 writers"):
        build_family(_cfg(folder, clients=1, heldout_writers=5))
    with pytest.raises(ConfigError, match=r"config key 'task.heldout_writers' must be null or at least 1"):
        _cfg(folder, heldout_writers=0)
    with pytest.raises(ConfigError, match=r"no training writer"):
        build_family(_cfg(folder, shots=2, query=2))


def test_malformed_leaf_files_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"does not exist"):
        read_leaf(tmp_path / "none")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFormatError, match=r"holds no LEAF \*.json files"):
        read_leaf(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    cases = [
        ({"writers": [], "data": {}}, r"must have keys 'users' and 'user_data'; it has \['data', 'writers'\]"),
        ({"users": ["a"], "user_data": {}}, r"lists user 'a' that has no entry in 'user_data'"),
        ({"users": ["a"], "user_data": {"a": {"pixels": []}}}, r"user_data\['a'\] must be an object with keys"),
        ({"users": ["a"], "user_data": {"a": {"x": [[0.5] * 10], "y": [1]}}}, r"x as \[n, 784\] pixels"),
        ({"users": ["a"], "num_samples": [2], "user_data": {"a": {"x": [[0.5] * 784], "y": [1]}}}, "num_samples"),
    ]
    for doc, match in cases:
        path = bad / "part.json"
        path.write_text(json.dumps(doc))
        with pytest.raises(DataFormatError, match=rf"LEAF file '{path}'.*" + match):
            read_leaf(bad)
    path.write_text("{not json")
    with pytest.raises(DataFormatError, match=rf"LEAF file '{path}' cannot be read as JSON"):
        read_leaf(bad)
