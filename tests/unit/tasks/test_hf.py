"""The ``hf`` family: local Hugging Face datasets (save_to_disk, imagefolder, parquet) made from glyph renders.

The datasets hold 30 glyph characters (Latin then Cyrillic) x 10 drawings as black-on-white PNGs;
the last 10 classes by label are held out. Under ``CI=true`` these tests never skip: CI installs
the ``datasets`` extra, and a missing one fails here.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from fedmeta.config import Config, config_from_dict
from fedmeta.errors import ConfigError, DataFormatError
from fedmeta.rng import make_generator
from fedmeta.tasks import TaskSource, build_family
from tests.unit.tasks.fewshot_helpers import glyph_classes, train_and_compare

if os.environ.get("CI", "").lower() not in ("1", "true", "yes"):
    pytest.importorskip("datasets", reason='the datasets extra is not installed: pip install -e ".[datasets]"')
    pytest.importorskip("flwr_datasets", reason='the datasets extra is not installed: pip install -e ".[datasets]"')

import datasets

from fedmeta.tasks.hf import HFFamily, build_hf_family, hf_offline, load_hf_pool

SIZE = 21
DRAWINGS = 10
ALPHABETS = {"Latin": 20, "Cyrillic": 10}
CLASSES = sum(ALPHABETS.values())
HELDOUT = 10
WRITERS = ("w0", "w1")


@pytest.fixture(scope="module")
def glyphs() -> list[np.ndarray]:
    return glyph_classes(ALPHABETS, size=SIZE, drawings=DRAWINGS)


def _rows(glyphs: list[np.ndarray]) -> tuple[list[Image.Image], list[int], list[str]]:
    images = [Image.fromarray(255 - d) for c in glyphs for d in c]
    labels = [i for i, c in enumerate(glyphs) for _ in c]
    # a natural id: drawing d of every class is by writer d mod 2
    writers = [WRITERS[d % len(WRITERS)] for c in glyphs for d in range(len(c))]
    return images, labels, writers


@pytest.fixture(scope="module")
def disk(tmp_path_factory: pytest.TempPathFactory, glyphs: list[np.ndarray]) -> Path:
    images, labels, writers = _rows(glyphs)
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "label": datasets.ClassLabel(num_classes=CLASSES),
            "writer": datasets.Value("string"),
        }
    )
    ds = datasets.Dataset.from_dict({"image": images, "label": labels, "writer": writers}, features=features)
    path = tmp_path_factory.mktemp("hf") / "disk"
    ds.save_to_disk(str(path))
    return path


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory: pytest.TempPathFactory, glyphs: list[np.ndarray]) -> Path:
    root = tmp_path_factory.mktemp("hf-imagefolder")
    for c, drawings in enumerate(glyphs):
        folder = root / f"class{c:02d}"
        folder.mkdir()
        for d, img in enumerate(drawings):
            Image.fromarray(255 - img).save(folder / f"{d:02d}.png")
    return root


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hf-cache")


def _cfg(path: Path, cache: Path, clients: int = 3, **hf: Any) -> Config:
    options: dict[str, Any] = {"path": str(path), "heldout_classes": HELDOUT, "invert": True}
    options.update(hf)
    return config_from_dict(
        {
            "seed": 0,
            "task": {
                "name": "hf",
                "ways": 5,
                "shots": 1,
                "query": 2,
                "image_size": SIZE,
                "cache_dir": str(cache),
                "hf": options,
            },
            "model": {"name": "conv4", "channels": 16},
            "federation": {"clients_total": clients, "clients_per_round": clients},
        }
    )


def _rows_of(batch: Any, family: HFFamily) -> set[int]:
    """Labels of the pool images an episode holds (matched by pixels)."""
    images = torch.from_numpy(family.pool.images).flatten(1).float() / 255.0
    found = set()
    for x in torch.cat([batch.support_x, batch.query_x], dim=1).flatten(0, 1):
        match = torch.nonzero((images - x.flatten()).abs().amax(dim=1) < 1e-6).flatten()
        assert match.numel() >= 1
        found.add(int(family.pool.labels[int(match[0])]))
    return found


def test_disk_dataset_splits_classes_and_yields_episodes(disk: Path, cache: Path, glyphs: list[np.ndarray]) -> None:
    fam = build_family(_cfg(disk, cache))
    assert isinstance(fam, HFFamily)
    assert fam.input_shape == (1, SIZE, SIZE)
    assert fam.classes("train").tolist() == list(range(CLASSES - HELDOUT))
    assert fam.classes("eval").tolist() == list(range(CLASSES - HELDOUT, CLASSES))
    # the pool is the PNGs read back and inverted: the glyph renders exactly
    assert np.array_equal(fam.pool.images[:DRAWINGS, 0], glyphs[0])
    batch = fam.sample(make_generator(0, "t"), 6, "eval")
    assert batch.support_x.shape == (6, 5, 1, SIZE, SIZE) and batch.query_x.shape == (6, 10, 1, SIZE, SIZE)
    assert batch.support_y.tolist()[0] == [0, 1, 2, 3, 4]
    assert batch.query_y.tolist()[0] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert _rows_of(batch, fam) <= set(range(CLASSES - HELDOUT, CLASSES))
    train = fam.sample(make_generator(0, "t"), 6, "train")
    assert _rows_of(train, fam) <= set(range(CLASSES - HELDOUT))


def test_default_heldout_is_a_fifth_at_least_ways(disk: Path, cache: Path) -> None:
    fam = build_family(_cfg(disk, cache, heldout_classes=None))
    assert isinstance(fam, HFFamily)
    assert fam.classes("eval").tolist() == list(range(CLASSES - 6, CLASSES))  # ceil(0.2 * 30) = 6 >= 5 ways
    with pytest.raises(ConfigError, match=r"task.hf.heldout_classes"):
        build_family(_cfg(disk, cache, heldout_classes=26))


def test_iid_partitions_are_disjoint_and_cover_the_background(disk: Path, cache: Path) -> None:
    src = TaskSource(_cfg(disk, cache, clients=3, partitioner="iid"))
    parts = [src.family(c)._rows[0] for c in range(3)]  # type: ignore[attr-defined]
    joined = np.concatenate(parts)
    assert len(set(joined.tolist())) == joined.size == (CLASSES - HELDOUT) * DRAWINGS
    assert all(abs(p.size - joined.size / 3) <= 1 for p in parts)
    batch = src.client_tasks(0, 1)
    assert batch.support_x.shape[1:] == (5, 1, SIZE, SIZE)


@pytest.mark.filterwarnings("ignore:Classes.*will NOT be used:UserWarning")
def test_pathological_and_dirichlet_partitions_skew_the_classes(disk: Path, cache: Path) -> None:
    src = TaskSource(_cfg(disk, cache, clients=2, partitioner="pathological", classes_per_partition=8))
    for c in range(2):
        fam = src.family(c)
        assert isinstance(fam, HFFamily)
        held = np.unique(fam.pool.labels[fam._rows[0]])
        assert held.size <= 8 and held.max() < CLASSES - HELDOUT
        assert set(_rows_of(src.client_tasks(0, c), fam)) <= set(held.tolist())
    cfg = _cfg(disk, cache, clients=2, partitioner="dirichlet", alpha=100.0)
    fams = [TaskSource(cfg).family(c) for c in range(2)]
    sizes = [f._rows[0].size for f in fams]  # type: ignore[attr-defined]
    assert sum(sizes) == (CLASSES - HELDOUT) * DRAWINGS and min(sizes) > 0


def test_natural_id_partitions_by_the_named_column(disk: Path, cache: Path) -> None:
    cfg = _cfg(disk, cache, clients=2, partitioner="natural-id", partition_by="writer")
    src = TaskSource(cfg)
    ds = datasets.load_from_disk(str(disk))
    writers = np.asarray(ds["writer"])
    seen = set()
    for c in range(2):
        rows = src.family(c)._rows[0]  # type: ignore[attr-defined]
        ids = set(writers[rows].tolist())
        assert len(ids) == 1
        seen |= ids
    assert seen == set(WRITERS)
    with pytest.raises(ConfigError, match=r"federation.clients_total' \(3\) exceeds the 2 partitions"):
        TaskSource(_cfg(disk, cache, clients=3, partitioner="natural-id", partition_by="writer")).family(0)
    with pytest.raises(ConfigError, match=r"task.hf.partition_by"):
        _cfg(disk, cache, partitioner="natural-id")


def test_imagefolder_and_parquet_load_the_same_images(
    disk: Path, imagefolder: Path, cache: Path, tmp_path: Path
) -> None:
    _, reference = load_hf_pool(_cfg(disk, cache))
    _, folder = load_hf_pool(_cfg(imagefolder, cache, format="imagefolder"))
    assert np.array_equal(folder.images, reference.images) and np.array_equal(folder.labels, reference.labels)
    assert folder.class_names[:2] == ("class00", "class01")
    parquet = tmp_path / "data.parquet"
    datasets.load_from_disk(str(disk)).to_parquet(str(parquet))
    _, table = load_hf_pool(_cfg(parquet, cache, format="parquet"))
    assert np.array_equal(table.images, reference.images) and np.array_equal(table.labels, reference.labels)


def test_second_load_reads_the_cached_pool(disk: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _cfg(disk, tmp_path / "c")
    _, first = load_hf_pool(cfg)
    assert list((tmp_path / "c" / "hf").glob("hf-*.npz"))
    caplog.set_level("DEBUG", logger="fedmeta.tasks.labelled")
    _, second = load_hf_pool(cfg)
    assert "loaded from" in caplog.text and np.array_equal(first.images, second.images)


def test_malformed_inputs_name_the_key_or_file(disk: Path, imagefolder: Path, cache: Path, tmp_path: Path) -> None:
    with pytest.raises(DataFormatError, match=r"'.*nowhere' \(task.hf.path\) does not exist"):
        build_hf_family(_cfg(tmp_path / "nowhere", cache))
    with pytest.raises(ConfigError, match=r"task.hf.path"):
        config_from_dict({"task": {"name": "hf"}, "model": {"name": "conv4"}})
    with pytest.raises(DataFormatError, match=r"no column 'pixels' \(task.hf.image_column\)"):
        build_hf_family(_cfg(disk, cache, image_column="pixels"))
    splits = tmp_path / "dict"
    datasets.DatasetDict({"train": datasets.load_from_disk(str(disk))}).save_to_disk(str(splits))
    with pytest.raises(DataFormatError, match=r"no split 'test' \(task.hf.split\); it has train"):
        build_hf_family(_cfg(splits, cache, split="test"))
    with pytest.raises(DataFormatError, match=r"cannot be opened as format 'disk'"):
        build_hf_family(_cfg(imagefolder, cache))
    broken = tmp_path / "broken"
    for c in range(CLASSES):
        (broken / f"class{c:02d}").mkdir(parents=True)
        for d in range(3):
            Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(broken / f"class{c:02d}" / f"{d}.png")
    (broken / "class00" / "3.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(DataFormatError, match=r"3.png|cannot be read as an image"):
        build_hf_family(_cfg(broken, tmp_path / "c3", format="imagefolder"))
    with pytest.raises(ConfigError, match=r"task.hf.format"):
        _cfg(disk, cache, format="csv")


def test_missing_extra_names_the_pip_command(disk: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib

    real = importlib.import_module

    def without_flower_datasets(name: str, package: str | None = None) -> Any:
        if name.startswith("flwr_datasets"):
            raise ImportError(f"No module named '{name}'", name=name)
        return real(name, package)

    monkeypatch.setattr(importlib, "import_module", without_flower_datasets)
    with pytest.raises(ConfigError, match=r"task.name' is 'hf'.*flwr_datasets.*pip install -e \"\.\[datasets\]\""):
        build_hf_family(_cfg(disk, cache))


def test_offline_switches_only_inside_the_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    # importing the family (and the registry) in a fresh interpreter changes no environment variable
    probe = "import os; before = dict(os.environ); import fedmeta.tasks; print(dict(os.environ) == before)"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip() == "True"
    with hf_offline():
        assert os.environ["HF_DATASETS_OFFLINE"] == "1" and os.environ["HF_HUB_OFFLINE"] == "1"
        assert datasets.config.HF_DATASETS_OFFLINE is True
    assert "HF_DATASETS_OFFLINE" not in os.environ and os.environ["HF_HUB_OFFLINE"] == "0"


@pytest.mark.slow
def test_short_meta_training_beats_the_nearest_neighbour_floor(disk: Path, cache: Path, tmp_path: Path) -> None:
    """Forty ProtoNet iterations of a tiny Conv-4 beat raw-pixel 1-NN on held-out 5-way 1-shot episodes."""
    cfg = config_from_dict(
        {
            "seed": 0,
            "task": {
                "name": "hf",
                "ways": 5,
                "shots": 1,
                "query": 5,
                "image_size": SIZE,
                "cache_dir": str(cache),
                "hf": {"path": str(disk), "heldout_classes": HELDOUT, "invert": True},
            },
            "model": {"name": "conv4", "channels": 16},
            "meta": {"algorithm": "protonet", "outer_lr": 0.01, "tasks_per_client": 4},
            "federation": {"clients_total": 1, "clients_per_round": 1, "rounds": 40},
            "eval": {"tasks": 100, "steps": 1, "every": 40, "batch": 100},
        }
    )
    final, floor = train_and_compare(cfg, tmp_path / "run")
    assert final["post_adapt_accuracy"] - 2 * final["post_adapt_accuracy_ci95"] > floor
