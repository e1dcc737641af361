"""``fedmeta make-data`` from datasets on disk (omniglot, femnist, class-folder tree, hf) writes loadable sites.

Each source is a small tree the test writes; site ``c`` must hold episodes of client ``c``'s own
share and held-out tasks of the source's held-out classes, in the format the ``folder`` family
reads, so that a deployment can run on them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image

from fedmeta.cli import main
from fedmeta.config import config_from_dict
from fedmeta.datagen import make_sites
from fedmeta.errors import ConfigError
from fedmeta.rng import make_generator
from fedmeta.tasks import TaskSource
from fedmeta.tasks.folder import FolderFamily, list_sites
from tests.unit.tasks.fewshot_helpers import glyph_classes

SIZE = 21
WAYS, SHOTS, QUERY = 3, 1, 2


def _png(path: Path, img: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)


def _omniglot(root: Path, glyphs: list[np.ndarray]) -> dict[str, Any]:
    for i, drawings in enumerate(glyphs):
        half, alphabet = ("images_evaluation", "Held") if i >= 8 else ("images_background", f"Alpha{i % 2}")
        for d, img in enumerate(drawings):
            _png(root / half / alphabet / f"character{i:02d}" / f"{d:02d}.png", 255 - img)
    return {"name": "omniglot", "data_dir": str(root), "partition": "script"}


def _classes(root: Path, glyphs: list[np.ndarray]) -> dict[str, Any]:
    for i, drawings in enumerate(glyphs):
        split = "test" if i >= 8 else "train"
        for d, img in enumerate(drawings):
            _png(root / split / f"n{i:02d}" / f"{d}.png", img)
    return {"name": "folder", "data_dir": str(root), "partition": "iid"}


def _femnist(root: Path, glyphs: list[np.ndarray]) -> dict[str, Any]:
    root.mkdir(parents=True)
    users: dict[str, dict[str, list[Any]]] = {}
    for w in range(3):  # writer w drew every character; the last writer is held out
        small = [np.asarray(Image.fromarray(g[w]).resize((28, 28))) for g in glyphs]
        users[f"f{w:04d}"] = {"x": [(1 - s.reshape(-1) / 255.0).tolist() for s in small for _ in range(3)],
                              "y": [c for c in range(len(small)) for _ in range(3)]}
    doc = {"users": sorted(users), "num_samples": [len(u["y"]) for u in users.values()], "user_data": users}
    (root / "all_data_0.json").write_text(json.dumps(doc))
    return {"name": "femnist", "data_dir": str(root), "heldout_writers": 1}


def _hf(root: Path, glyphs: list[np.ndarray]) -> dict[str, Any]:
    if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
        pytest.importorskip("datasets", reason='the datasets extra is not installed: pip install -e ".[datasets]"')
        pytest.importorskip("flwr_datasets", reason='the datasets extra is not installed: pip install -e ".[datasets]"')
    import datasets

    images = [Image.fromarray(d) for g in glyphs for d in g]
    labels = [c for c, g in enumerate(glyphs) for _ in g]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=len(glyphs))})
    datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).save_to_disk(str(root))
    return {"name": "hf", "hf": {"path": str(root), "heldout_classes": 4}}


SOURCES = {"omniglot": _omniglot, "femnist": _femnist, "folder": _classes, "hf": _hf}


@pytest.fixture(scope="module")
def glyphs() -> list[np.ndarray]:
    return glyph_classes({"Latin": 8, "Cyrillic": 4}, size=SIZE, drawings=4)


def _cfg(task: dict[str, Any], cache: Path, clients: int = 2) -> dict[str, Any]:
    common = {"ways": WAYS, "shots": SHOTS, "query": QUERY, "image_size": SIZE, "cache_dir": str(cache)}
    return {
        "seed": 0,
        "task": {**common, **task},
        "model": {"name": "conv4", "channels": 8},
        "federation": {"clients_total": clients, "clients_per_round": clients},
    }


@pytest.mark.parametrize("source", SOURCES)
def test_make_data_output_loads_as_site_folders(source: str, glyphs: list[np.ndarray], tmp_path: Path) -> None:
    task = SOURCES[source](tmp_path / "data", glyphs)
    cfg = config_from_dict(_cfg(task, tmp_path / "cache"))
    written = make_sites(cfg, 2, tmp_path / "sites", tasks_per_site=4, heldout_per_site=2)
    assert [p.name for p in written] == ["site-0000", "site-0001"] == [p.name for p in list_sites(tmp_path / "sites")]
    for site in written:
        fam = FolderFamily(site, shots=SHOTS, query=QUERY, ways=WAYS)
        assert fam.kind == "classification" and fam.input_shape == (1, SIZE, SIZE)
        assert len(fam.tasks("train")) == 4 and len(fam.tasks("eval")) == 2
        stored = fam.tasks("train")[0]
        assert stored.x is not None and stored.x.shape == (WAYS * (SHOTS + QUERY), 1, SIZE, SIZE)
    # the sites are a federation: two clients, one site each
    sites = config_from_dict(
        _cfg({"name": "folder", "data_dir": str(tmp_path / "sites")}, tmp_path / "cache") | {"model": {"name": "conv4"}}
    )
    src = TaskSource(sites)
    assert src.num_sites == 2
    batch = src.client_tasks(0, 1)
    assert batch.support_x.shape[1:] == (WAYS * SHOTS, 1, SIZE, SIZE) and batch.query_y.shape[1] == WAYS * QUERY
    # site c holds episodes of client c's own share: what the source gives client c
    own = TaskSource(cfg).family(1).sample(make_generator(0, "make-data", "train", 1), 4, "train")
    assert np.array_equal(np.asarray(FolderFamily(written[1], shots=SHOTS, query=QUERY, ways=WAYS).tasks("train")[0].x),
                          np.concatenate([own.support_x[0].numpy(), own.query_x[0].numpy()]))


def test_make_data_command_writes_a_class_tree_as_sites(glyphs: list[np.ndarray], tmp_path: Path) -> None:
    task = _classes(tmp_path / "tree", glyphs)
    config = tmp_path / "tree.yaml"
    config.write_text(yaml.safe_dump(_cfg(task, tmp_path / "cache", clients=3)))
    rc = main(["make-data", str(config), "--sites", "3", "--out", str(tmp_path / "sites"), "--quiet"])
    assert rc == 0 and len(list_sites(tmp_path / "sites")) == 3
    with pytest.raises(ConfigError, match=r"--sites 4 exceeds federation.clients_total \(3\)"):
        make_sites(config_from_dict(_cfg(task, tmp_path / "cache", clients=3)), 4, tmp_path / "more")
    # a local deployment writes its sites from the tree, and a server's held-out site after them
    from fedmeta.flower.deploy.local import prepare_sites

    cfg = config_from_dict(_cfg(task, tmp_path / "cache", clients=2))
    deployed = prepare_sites(cfg, 2, tmp_path / "deploy")
    assert [p.name for p in deployed] == ["site-0000", "site-0001"]
    held = make_sites(cfg, 1, tmp_path / "held", first=2)[0]
    assert held.name == "site-0002" and len(FolderFamily(held, shots=SHOTS, query=QUERY, ways=WAYS).tasks("eval")) == 5
    plain = _cfg({"name": "folder", "data_dir": str(tmp_path / "sites")}, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"task.data_dir is not a class-folder tree"):
        make_sites(config_from_dict(plain), 1, tmp_path / "again")
