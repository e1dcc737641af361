"""The folder family's image-folder tasks and split ratio (``docs/data-format.md``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fedmeta.errors import DataFormatError
from fedmeta.tasks.folder import FolderFamily, load_image, load_site_tasks, write_site


def _png(path: Path, arr: np.ndarray) -> None:
    """Save a uint8 array as PNG: 2-D is grayscale (L), [H, W, 3] is RGB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _image_task(
    root: Path, classes: list[str], per_class: int, seed: int, size: int = 6
) -> dict[str, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    written: dict[str, list[np.ndarray]] = {}
    for c in classes:
        for i in range(per_class):
            arr = rng.integers(0, 256, size=(size, size), dtype=np.uint8)
            _png(root / c / f"{i:03d}.png", arr)
            written.setdefault(c, []).append(arr)
    return written


def test_image_folders_read_as_classification_tasks(tmp_path: Path) -> None:
    site = tmp_path / "site"
    written = _image_task(site / "tasks" / "letters", ["beta", "alpha", "gamma"], per_class=4, seed=0)
    _image_task(site / "tasks" / "digits", ["0", "1", "2"], per_class=4, seed=1)
    tasks = load_site_tasks(site)  # no site.yaml: a site of image folders is a classification site
    assert [t.name for t in tasks] == ["digits", "letters"]
    letters = tasks[1]
    assert letters.classes == ("alpha", "beta", "gamma")
    assert letters.x.shape == (12, 1, 6, 6) and letters.x.dtype == np.float32
    # label i is the i-th class folder in sorted order; pixels are scaled to [0, 1]
    first_beta = letters.x[letters.y == 1][0, 0]
    np.testing.assert_allclose(first_beta, written["beta"][0] / 255.0, atol=1e-7)
    fam = FolderFamily(site, shots=1, query=2, ways=3)
    assert fam.kind == "classification" and fam.input_shape == (1, 6, 6)
    batch = fam.sample(torch.Generator().manual_seed(0), 2)
    assert batch.support_x.shape == (2, 3, 1, 6, 6) and batch.query_y.shape == (2, 6)


def test_declared_image_split_keeps_sides_apart(tmp_path: Path) -> None:
    task = tmp_path / "site" / "tasks" / "t"
    sup = _image_task(task / "support", ["a", "b"], per_class=2, seed=2)
    _image_task(task / "query", ["a", "b"], per_class=3, seed=3)
    (tmp_path / "site" / "site.yaml").write_text("kind: classification\n")
    [t] = load_site_tasks(tmp_path / "site")
    assert t.x is None and t.support[0].shape == (4, 1, 6, 6) and t.query[0].shape == (6, 1, 6, 6)
    fam = FolderFamily(tmp_path / "site", shots=2, query=3, ways=2)
    batch = fam.sample(torch.Generator().manual_seed(1), 3)
    support_pixels = {a.tobytes() for arrs in sup.values() for a in arrs}

    def as_png(img: torch.Tensor) -> bytes:
        return np.rint(img[0].numpy() * 255).astype(np.uint8).tobytes()

    for e in range(3):
        assert all(as_png(img) in support_pixels for img in batch.support_x[e])
        assert not any(as_png(img) in support_pixels for img in batch.query_x[e])
    _image_task(task / "query", ["c"], per_class=1, seed=4)
    with pytest.raises(DataFormatError, match="query' has class folders \\['a', 'b', 'c'\\]"):
        load_site_tasks(tmp_path / "site")


def test_colour_images_have_three_channels(tmp_path: Path) -> None:
    arr = np.zeros((5, 7, 3), np.uint8)
    arr[..., 0] = 255
    _png(tmp_path / "red.png", arr)
    img = load_image(tmp_path / "red.png")
    assert img.shape == (3, 5, 7) and img[0].min() == 1.0 and img[1].max() == 0.0


def test_image_errors_name_the_file(tmp_path: Path) -> None:
    site = tmp_path / "site"
    _image_task(site / "tasks" / "t", ["a", "b"], per_class=2, seed=5)
    bad = site / "tasks" / "t" / "b" / "broken.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(DataFormatError, match="broken.png' cannot be read as an image"):
        load_site_tasks(site)
    bad.unlink()
    _png(site / "tasks" / "t" / "b" / "big.png", np.zeros((9, 9), np.uint8))
    with pytest.raises(DataFormatError, match="big.png' has shape \\(1, 9, 9\\)"):
        load_site_tasks(site)
    (site / "tasks" / "t" / "b" / "big.png").unlink()
    (site / "tasks" / "t" / "c").mkdir()
    with pytest.raises(DataFormatError, match="class folder '.*c' holds no images"):
        load_site_tasks(site)
    (site / "tasks" / "t" / "c").rmdir()
    (site / "site.yaml").write_text("kind: regression\n")
    with pytest.raises(DataFormatError, match="only classification sites"):
        load_site_tasks(site)
    (site / "site.yaml").write_text("kind: classification\n")
    with pytest.raises(DataFormatError, match="t.* has only 2 classes with enough examples for 3-way"):
        FolderFamily(site, shots=1, query=1, ways=3)


def test_query_fraction_splits_each_task_once(tmp_path: Path) -> None:
    x = np.arange(20, dtype=np.float32)[:, None]
    site = write_site(tmp_path / "site", [("a", x, x[:, 0] * 2), ("b", x, x[:, 0])], kind="regression")
    (site / "site.yaml").write_text("kind: regression\nquery_fraction: 0.25\n")
    a1, b1 = load_site_tasks(site)
    a2, _ = load_site_tasks(site)
    assert a1.x is None and a1.support[0].shape == (15, 1) and a1.query[0].shape == (5, 1)
    np.testing.assert_array_equal(a1.query[0], a2.query[0])  # the same split on every load
    assert not set(a1.support[0][:, 0]) & set(a1.query[0][:, 0])
    assert not np.array_equal(np.sort(a1.query[0][:, 0]), np.sort(b1.query[0][:, 0]))  # per task
    fam = FolderFamily(site, shots=15, query=5)
    batch = fam.sample(torch.Generator().manual_seed(0), 2)
    q = set(a1.query[0][:, 0].tolist())
    for e in range(2):
        if batch.ids[e] == "a":
            assert set(batch.query_x[e][:, 0].tolist()) == q
    with pytest.raises(DataFormatError, match="has 15 support and 5 query examples|declares 15 support and 5 query"):
        FolderFamily(site, shots=16, query=5)


def test_query_fraction_is_stratified_for_classification_and_validated(tmp_path: Path) -> None:
    x = np.random.default_rng(0).normal(size=(30, 3)).astype(np.float32)
    y = np.repeat(np.arange(3), 10)
    site = write_site(tmp_path / "site", [("c", x, y)], kind="classification")
    (site / "site.yaml").write_text("kind: classification\nquery_fraction: 0.3\n")
    [t] = load_site_tasks(site)
    assert np.bincount(t.query[1]).tolist() == [3, 3, 3] and np.bincount(t.support[1]).tolist() == [7, 7, 7]
    (site / "site.yaml").write_text("kind: classification\nquery_fraction: 1.5\n")
    with pytest.raises(
        DataFormatError, match="site.yaml': query_fraction must be a number strictly between 0 and 1, got 1.5"
    ):
        load_site_tasks(site)
