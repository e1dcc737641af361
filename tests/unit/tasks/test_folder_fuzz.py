"""Fuzzing site-data folders (hypothesis): any folder gets a DataFormatError (or ConfigError) or loads and samples.

A random site: a ``site.yaml`` of random content, task files holding random arrays (random
names, dtypes and shapes), random bytes under task-file names, image-folder tasks of real and
broken images, and stray CSV/JSON files. Loading it as the ``folder`` family either works --
and then drawing episodes works too -- or is refused with a domain error naming the file.
"""

from __future__ import annotations

import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from hypothesis import given
from hypothesis import strategies as st

from fedmeta.errors import DataFormatError, FedMetaError
from fedmeta.tasks.folder import FolderFamily, list_sites
from tests.unit.fuzzing import fuzz_settings

DTYPES = ("float32", "float64", "int64", "int8", "uint8", "bool", "complex64", "U3")
ARRAY_NAMES = ("x", "y", "support_x", "support_y", "query_x", "query_y", "z")


@st.composite
def arrays(draw: st.DrawFn) -> np.ndarray:
    dtype = draw(st.sampled_from(DTYPES))
    shape = tuple(draw(st.lists(st.integers(0, 6), max_size=3)))
    if dtype == "U3":
        return np.full(shape, "ab", dtype=dtype)
    special = draw(st.sampled_from([None, np.nan, np.inf, 1e300, -7, 2**40]))
    size = int(np.prod(shape)) if shape else 1
    flat = np.array(draw(st.lists(st.integers(-3, 12), min_size=size, max_size=size)), dtype=np.int64)
    arr = flat.reshape(shape).astype(dtype)
    if special is not None and size and np.issubdtype(arr.dtype, np.inexact):
        with np.errstate(over="ignore"):
            arr.flat[draw(st.integers(0, size - 1))] = special  # 1e300 is inf in float32
    elif special in (-7, 2**40) and size and arr.dtype == np.int64:
        arr.flat[draw(st.integers(0, size - 1))] = special  # a negative or huge class label
    return arr


@st.composite
def npz_bytes(draw: st.DrawFn) -> bytes:
    names = draw(st.lists(st.sampled_from(ARRAY_NAMES), min_size=0, max_size=4, unique=True))
    if draw(st.integers(0, 2)):  # a consistent x/y task, sometimes perturbed: most such files load
        n = draw(st.integers(1, 16))
        x = np.arange(n * 2, dtype=np.float32).reshape(n, 2)
        classes = draw(st.integers(1, 4))
        y = np.array([i % classes for i in range(n)], dtype=draw(st.sampled_from(["int64", "int64", "float32"])))
        found: dict[str, Any] = {"x": x, "y": y}
        for name in names if draw(st.integers(0, 2)) == 0 else ():
            found[name] = draw(arrays())
    else:
        found = {name: draw(arrays()) for name in names}
    buf = io.BytesIO()
    np.savez(buf, **found)
    data = buf.getvalue()
    cut = draw(st.sampled_from([None, None, None, 0, 10, len(data) // 2, len(data) - 1]))
    return data if cut is None else data[:cut]


@st.composite
def image_bytes(draw: st.DrawFn) -> bytes:
    from PIL import Image

    kind = draw(st.sampled_from(["png", "png", "broken", "random"]))
    if kind == "random":
        return draw(st.binary(max_size=64))
    side = draw(st.integers(1, 5))
    mode = draw(st.sampled_from(["L", "RGB", "RGBA", "P", "1", "I;16"]))
    img = Image.new(mode, (side, draw(st.sampled_from([side, side + 1]))))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    data = buf.getvalue()
    if kind == "broken":
        pos = draw(st.integers(8, len(data) - 1))
        data = data[:pos] + bytes([data[pos] ^ 0xFF]) + data[pos + 1 :]
    return data


@st.composite
def sites(draw: st.DrawFn) -> dict[str, bytes]:
    """A site folder as ``{relative path: bytes}``."""
    files: dict[str, bytes] = {}
    meta = draw(
        st.one_of(
            st.none(),
            st.fixed_dictionaries(
                {},
                optional={
                    "kind": st.sampled_from(["regression", "classification", "", "images", 3, None]),
                    "query_fraction": st.one_of(st.floats(-1, 2), st.sampled_from([0.5, 0.25, "half", True])),
                    "name": st.text(max_size=5),
                },
            ),
        )
    )
    if meta is not None:
        files["site.yaml"] = yaml.safe_dump(meta).encode()
    if draw(st.integers(0, 19)) == 0:
        files["site.yaml"] = draw(st.sampled_from([b"\xff\xfe\x00", b"[1, 2", b"- a\n- b\n"]))
    for sub in ("tasks", "heldout") if draw(st.booleans()) else ("tasks",):
        for i in range(draw(st.integers(0, 3))):
            shape = draw(st.sampled_from(["npz", "npz", "npz", "images", "bytes", "stray"]))
            if shape == "npz":
                files[f"{sub}/t{i}.npz"] = draw(npz_bytes())
            elif shape == "bytes":
                files[f"{sub}/t{i}.npz"] = draw(st.binary(max_size=40))
            elif shape == "stray":
                name = draw(st.sampled_from(["notes.csv", "meta.json", "x.npy"]))
                files[f"{sub}/{name}"] = draw(st.sampled_from([b"a,b\n1,2\n", b'{"x": [1, 2]}', b"\x00\x01"]))
            else:
                split = draw(st.sampled_from(["", "support/", "query/"]))
                for c in range(draw(st.integers(1, 3))):
                    for j in range(draw(st.integers(1, 3))):
                        files[f"{sub}/t{i}/{split}c{c}/{j}.png"] = draw(image_bytes())
    return files


def _write(root: Path, files: dict[str, bytes]) -> Path:
    site = root / "site-0000"
    (site / "tasks").mkdir(parents=True)
    for rel, data in files.items():
        path = site / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return site


@fuzz_settings(120)
@given(
    sites(),
    st.integers(1, 3),
    st.integers(1, 3),
    st.integers(1, 3),
    st.sampled_from([None, "regression", "classification"]),
)
def test_a_random_site_folder_loads_and_samples_or_is_refused_in_domain_terms(
    files: dict[str, bytes], shots: int, query: int, ways: int, kind: str | None
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        site = _write(Path(tmp), files)
        try:
            assert list_sites(tmp) == [site]
            family = FolderFamily(site, shots=shots, query=query, ways=ways, kind=kind)
        except FedMetaError as exc:
            assert str(exc)
            return
        for split in ("train", "eval"):
            try:
                batch = family.sample(torch.Generator().manual_seed(0), 3, split)
            except FedMetaError:
                assert split == "eval"  # no heldout/ folder
                continue
            assert batch.support_x.shape[:2] == (3, shots * (ways if family.kind == "classification" else 1))
            assert bool(torch.isfinite(batch.support_x).all() and torch.isfinite(batch.query_x).all())


# -- the crashes the fuzzing found, pinned ---------------------------------------------------------


def _site_with(tmp_path: Path, tasks: dict[str, dict[str, np.ndarray]], *, meta: bytes | None = None) -> Path:
    site = tmp_path / "site"
    for sub_name, arrays_of in tasks.items():
        path = site / sub_name
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **arrays_of)
    (site / "tasks").mkdir(parents=True, exist_ok=True)
    if meta is not None:
        (site / "site.yaml").write_bytes(meta)
    return site


def test_a_site_yaml_that_is_not_utf8_is_a_data_format_error(tmp_path: Path) -> None:
    site = _site_with(tmp_path, {"tasks/a.npz": {"x": np.zeros((4, 1)), "y": np.zeros(4)}}, meta=b"\xff\xfe\x00")
    with pytest.raises(DataFormatError, match=r"site file '.*site.yaml' is not valid YAML"):
        FolderFamily(site, shots=1, query=1)


@pytest.mark.parametrize(
    ("arrays_of", "match"),
    [
        ({"x": np.zeros((4, 1)), "y": np.array(3.0)}, r"'y' must be an array with one entry per example"),
        ({"x": np.zeros((4, 1)), "y": np.zeros((4, 2, 2))}, r"regression targets 'y' must be \[N\] or \[N, outputs\]"),
        ({"x": np.zeros((4, 1)), "y": np.zeros((4, 0))}, r"regression targets 'y' must be \[N\] or \[N, outputs\]"),
        ({"x": np.zeros((4, 0)), "y": np.zeros(4)}, r"'x' has shape \(4, 0\), an example with no values"),
        ({"x": np.full((4, 1), 1e300), "y": np.zeros(4)}, r"'x' contains NaN or Inf \(or values beyond float32\)"),
        ({"x": np.ones((4, 1), dtype=np.complex64), "y": np.zeros(4)}, r"'x' must hold real numbers"),
    ],
)
def test_malformed_task_arrays_are_data_format_errors(
    tmp_path: Path, arrays_of: dict[str, np.ndarray], match: str
) -> None:
    site = _site_with(tmp_path, {"tasks/a.npz": arrays_of})
    with pytest.raises(DataFormatError, match=match):
        FolderFamily(site, shots=1, query=1, kind="regression")


def test_tasks_with_targets_of_different_shapes_are_a_data_format_error(tmp_path: Path) -> None:
    site = _site_with(
        tmp_path,
        {
            "tasks/a.npz": {"x": np.zeros((4, 1)), "y": np.zeros(4)},
            "tasks/b.npz": {"x": np.zeros((4, 1)), "y": np.zeros((4, 2))},
        },
    )
    with pytest.raises(DataFormatError, match="targets of different shapes"):
        FolderFamily(site, shots=1, query=1, kind="regression")
    held = _site_with(
        tmp_path / "held",
        {
            "tasks/a.npz": {"x": np.zeros((4, 1)), "y": np.zeros(4)},
            "heldout/b.npz": {"x": np.zeros((4, 3)), "y": np.zeros(4)},
        },
    )
    with pytest.raises(DataFormatError, match="heldout/ tasks have another input or target shape"):
        FolderFamily(held, shots=1, query=1, kind="regression")


@pytest.mark.parametrize("labels", [[-1, -1, 0, 0, 5, 5], [0, 0, 1, 1, 2**40, 2**40]])
def test_negative_and_huge_class_labels_are_classes_like_any_other(tmp_path: Path, labels: list[int]) -> None:
    x = np.arange(6, dtype=np.float32).reshape(6, 1)
    site = _site_with(tmp_path, {"tasks/a.npz": {"x": x, "y": np.array(labels, dtype=np.int64)}})
    family = FolderFamily(site, shots=1, query=1, ways=3, kind="classification")
    batch = family.sample(torch.Generator().manual_seed(0), 2, "train")
    assert sorted(batch.support_y[0].tolist()) == [0, 1, 2] and batch.support_x.shape == (2, 3, 1)
