"""The ``folder`` family on a class-folder tree in the mini-ImageNet split layout (``train/``, ``val/``, ``test/``).

The tree holds glyph renders saved as PNGs at twice the loaded size (box-resizing back must give
the renders exactly): 20 Latin characters in ``train/``, 10 Cyrillic ones in ``test/``, and a
``val/`` folder that is not read.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from fedmeta.config import Config, config_from_dict
from fedmeta.errors import ConfigError, DataFormatError
from fedmeta.rng import make_generator
from fedmeta.tasks import TaskSource, build_family
from fedmeta.tasks.class_folders import ClassTreeFamily, build_class_tree_family, is_class_tree, scan_class_tree
from tests.unit.tasks.fewshot_helpers import glyph_classes, train_and_compare

SIZE = 21
DRAWINGS = 10
TRAIN, TEST = 20, 10


@pytest.fixture(scope="module")
def glyphs() -> list[np.ndarray]:
    return glyph_classes({"Latin": TRAIN, "Cyrillic": TEST}, size=SIZE, drawings=DRAWINGS)


def _write_tree(root: Path, glyphs: list[np.ndarray], drawings: int = DRAWINGS) -> Path:
    splits = {"train": glyphs[:TRAIN], "val": glyphs[TRAIN : TRAIN + 2], "test": glyphs[TRAIN:]}
    for split, classes in splits.items():
        for c, images in enumerate(classes):
            folder = root / split / f"n{c:04d}"
            folder.mkdir(parents=True)
            for d, img in enumerate(images[:drawings]):
                big = np.repeat(np.repeat(img, 2, axis=0), 2, axis=1)
                Image.fromarray(big).save(folder / f"{d:03d}.png")
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory, glyphs: list[np.ndarray]) -> Path:
    return _write_tree(tmp_path_factory.mktemp("classes"), glyphs)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("classes-cache")


def _cfg(tree: Path, cache: Path, clients: int = 3, **task: Any) -> Config:
    base: dict[str, Any] = {
        "name": "folder",
        "data_dir": str(tree),
        "ways": 5,
        "shots": 1,
        "query": 2,
        "image_size": SIZE,
        "cache_dir": str(cache),
        "partition": "iid",
    }
    base.update(task)
    return config_from_dict(
        {
            "seed": 0,
            "task": base,
            "model": {"name": "conv4", "channels": 16},
            "federation": {"clients_total": clients, "clients_per_round": clients},
        }
    )


def test_tree_splits_by_folder_and_reads_the_images_resized(tree: Path, cache: Path, glyphs: list[np.ndarray]) -> None:
    assert is_class_tree(tree)
    scanned = scan_class_tree(tree, min_images=3)
    assert scanned.names[0] == "train/n0000" and scanned.names[TRAIN] == "test/n0000"
    assert len(scanned) == TRAIN + TEST  # val/ is not read
    fam = build_family(_cfg(tree, cache))
    assert isinstance(fam, ClassTreeFamily)
    assert fam.input_shape == (1, SIZE, SIZE)
    assert np.array_equal(fam.pool.images[:DRAWINGS, 0], glyphs[0])
    assert fam.classes("train").tolist() == list(range(TRAIN))
    assert fam.classes("eval").tolist() == list(range(TRAIN, TRAIN + TEST))
    batch = fam.sample(make_generator(0, "e"), 4, "eval")
    assert batch.support_x.shape == (4, 5, 1, SIZE, SIZE) and batch.query_x.shape == (4, 10, 1, SIZE, SIZE)
    assert all(n.startswith("test/") for ids in batch.ids for n in ids.split())
    assert batch.query_y.tolist()[0] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_clients_hold_shares_of_the_train_classes(tree: Path, cache: Path) -> None:
    src = TaskSource(_cfg(tree, cache, clients=3, partition="dirichlet", dirichlet_alpha=0.5))
    assert src.num_sites is None
    shares = []
    for c in range(3):
        fam = src.family(c)
        assert isinstance(fam, ClassTreeFamily)
        held = set(fam.classes("train").tolist())
        assert held < set(range(TRAIN)) and len(held) >= 5
        batch = src.client_tasks(0, c)
        assert {n for ids in batch.ids for n in ids.split()} <= {fam.tree.names[k] for k in held}
        shares.append(held)
    assert len({frozenset(s) for s in shares}) == 3
    iid = TaskSource(_cfg(tree, cache, clients=2))
    assert iid.family(1).classes("train").tolist() == list(range(TRAIN))  # type: ignore[attr-defined]
    assert all(n.startswith("test/") for ids in iid.eval_tasks(5).ids for n in ids.split())
    # a node given its own tree (a SuperNode's data-dir) reads it, whatever the config's task.data_dir
    bare = config_from_dict(
        {
            "task": {"name": "folder", "ways": 5, "shots": 1, "query": 2, "image_size": SIZE, "cache_dir": str(cache)},
            "model": {"name": "conv4"},
            "federation": {"clients_total": 2, "clients_per_round": 2},
            "eval": {"server": False, "clients": 1},
        }
    )
    nodes = TaskSource(bare, data_dir=tree)
    held = set(nodes.family(0).classes("train").tolist())  # type: ignore[attr-defined]
    assert len(held) >= 5 and held <= set(range(TRAIN))
    with pytest.raises(ConfigError, match=r"task.partition' must be one of iid, dirichlet for a class-folder"):
        TaskSource(_cfg(tree, cache, partition="script")).family(0)


def test_colour_images_give_three_channels(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        for c in range(5):
            folder = tmp_path / "tree" / split / f"c{c}"
            folder.mkdir(parents=True)
            for d in range(3):
                Image.fromarray(rng.integers(0, 255, (30, 40, 3), dtype=np.uint8)).save(folder / f"{d}.jpg")
    fam = build_family(_cfg(tmp_path / "tree", tmp_path / "c", clients=1, image_size=16))
    assert fam.input_shape == (3, 16, 16)
    assert fam.sample(make_generator(0), 2, "train").support_x.shape == (2, 5, 3, 16, 16)


def test_second_load_reads_the_cached_pool(tree: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(tree, tmp_path / "cache")
    first = build_class_tree_family(cfg)
    assert list((tmp_path / "cache" / "classes").glob("classes-*.npz"))
    caplog.set_level(logging.DEBUG, logger="fedmeta.tasks.labelled")
    second = build_class_tree_family(cfg)
    assert "loaded from" in caplog.text and np.array_equal(first.pool.images, second.pool.images)


def test_malformed_trees_name_the_folder_or_file(tmp_path: Path, glyphs: list[np.ndarray]) -> None:
    root = _write_tree(tmp_path / "t", glyphs, drawings=3)
    cache = tmp_path / "c"
    for path in sorted((root / "test").iterdir()):
        path.rename(tmp_path / path.name)
    (root / "test").rmdir()
    with pytest.raises(DataFormatError, match=rf"tree '{root}' \(task.data_dir\) lacks its 'test' folder"):
        build_family(_cfg(root, cache))
    (root / "test").mkdir()
    with pytest.raises(DataFormatError, match=r"holds no class folders"):
        build_family(_cfg(root, cache))
    (tmp_path / "n0000").rename(root / "test" / "n0000")
    with pytest.raises(DataFormatError, match=rf"class folder '{root / 'train' / 'n0000'}' has 3 images, fewer than"):
        build_family(_cfg(root, cache, query=3))
    bad = root / "train" / "n0001" / "009.png"
    bad.write_bytes(b"\x89PNG broken")
    with pytest.raises(DataFormatError, match=rf"image file '{bad}' cannot be read as an image"):
        build_family(_cfg(root, cache))
    with pytest.raises(ConfigError, match=r"no held-out class folder set .* has 5 classes"):
        bad.unlink()
        build_family(_cfg(root, cache))


@pytest.mark.slow
def test_short_meta_training_beats_the_nearest_neighbour_floor(tree: Path, cache: Path, tmp_path: Path) -> None:
    """Forty ProtoNet iterations of a tiny Conv-4 beat raw-pixel 1-NN on held-out 5-way 1-shot episodes."""
    cfg = config_from_dict(
        {
            "seed": 0,
            "task": {"name": "folder", "data_dir": str(tree), "ways": 5, "shots": 1, "query": 5, "image_size": SIZE,
                     "cache_dir": str(cache)},
            "model": {"name": "conv4", "channels": 16},
            "meta": {"algorithm": "protonet", "outer_lr": 0.01, "tasks_per_client": 4},
            "federation": {"clients_total": 1, "clients_per_round": 1, "rounds": 40},
            "eval": {"tasks": 100, "steps": 1, "every": 40, "batch": 100},
        }
    )
    final, floor = train_and_compare(cfg, tmp_path / "run")
    assert final["post_adapt_accuracy"] - 2 * final["post_adapt_accuracy_ci95"] > floor
