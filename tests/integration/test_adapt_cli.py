"""``fedmeta adapt`` / ``fedmeta predict`` end to end through the real console entry point, and every
bad input answered with one paragraph naming the file, a non-zero exit and no traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from fedmeta.checkpoint import save_checkpoint
from fedmeta.cli import main
from fedmeta.config import config_from_dict, to_dict
from fedmeta.errors import CheckpointError, DataFormatError
from fedmeta.experiment import Experiment
from fedmeta.tasks.folder import write_site

SINUSOID = {
    "seed": 0,
    "task": {"name": "sinusoid", "shots": 10, "query": 10},
    "model": {"name": "mlp", "hidden": [40, 40]},
    "meta": {"algorithm": "maml", "inner_lr": 0.01, "inner_steps": 1, "outer_lr": 0.01},
    "federation": {"clients_total": 100, "clients_per_round": 10, "rounds": 400},
    "eval": {"tasks": 20, "steps": 10, "every": 400},
}


def _fedmeta(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "fedmeta.cli", *args], capture_output=True, text=True, timeout=600, cwd=cwd, env=env
    )


@pytest.mark.slow
def test_new_site_adapts_compares_and_predicts_offline(tmp_path: Path) -> None:
    cfg = tmp_path / "sinusoid.yaml"
    cfg.write_text(yaml.safe_dump(SINUSOID))
    for args in (
        ["centralized", str(cfg), "--out", "maml", "--quiet"],
        [
            "centralized",
            str(cfg),
            "--out",
            "fedavg",
            "--quiet",
            "--set",
            "meta.algorithm=fedavg",
            "federation.rounds=100",
        ],
        [
            "make-data",
            str(cfg),
            "--sites",
            "1",
            "--out",
            "sites",
            "--tasks-per-site",
            "3",
            "--heldout",
            "2",
            "--set",
            "seed=11",
        ],
    ):
        proc = _fedmeta(*args, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
    proc = _fedmeta(
        "adapt", "--checkpoint", "maml/checkpoint.pt", "--data", "sites/site-0000", "--out", "adapted",
        "--compare", "fedavg/checkpoint.pt", "--steps", "5", "--episodes", "8", "--quiet", cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    # the printed summary puts the three initializations side by side and points to deployment
    for needle in (
        "meta-initialization (maml)",
        "random initialization",
        "fedavg-trained initialization",
        "docs/deployment.md",
    ):
        assert needle in proc.stdout
    report = json.loads((tmp_path / "adapted" / "adapt_report.json").read_text())
    assert set(report["initializations"]) == {"meta", "random", "compare"}
    assert report["settings"] == {**report["settings"], "steps": 5, "episodes": 8, "shots": 10, "query": 10}
    meta = report["initializations"]["meta"]["aggregate"]
    assert meta["post_adapt_loss"] < 0.5 * meta["pre_adapt_loss"]
    assert meta["post_adapt_loss"] < report["initializations"]["random"]["aggregate"]["post_adapt_loss"]
    assert report["initializations"]["compare"]["algorithm"] == "fedavg"
    assert (tmp_path / "adapted" / "adaptation_curve.png").stat().st_size > 1000
    manifest = json.loads((tmp_path / "adapted" / "models" / "manifest.json").read_text())
    assert sorted(manifest["tasks"]) == ["train-0000", "train-0001", "train-0002"]

    np.savez(tmp_path / "x.npz", x=np.linspace(-4, 4, 6, dtype=np.float32)[:, None])
    proc = _fedmeta(
        "predict", "--models", "adapted", "--task", "train-0002", "--input", "x.npz", "--out", "pred.json", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    pred = json.loads((tmp_path / "pred.json").read_text())
    assert pred["task"] == "train-0002" and np.asarray(pred["predictions"]).shape == (6, 1)
    # the documented Python call gives the same numbers
    from fedmeta.adaptation import load_personalized

    direct = load_personalized(tmp_path / "adapted").predict("train-0002", np.load(tmp_path / "x.npz")["x"])
    np.testing.assert_allclose(direct, np.asarray(pred["predictions"]), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# Bad input through the CLI


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """An (untrained) sinusoid checkpoint, a good site, and the bad inputs."""
    root = tmp_path_factory.mktemp("bad")
    cfg = config_from_dict(SINUSOID)
    exp = Experiment(cfg)
    ckpt = save_checkpoint(
        root / "good.pt",
        meta_params=exp.initial_meta_params(),
        round_idx=0,
        config=to_dict(cfg),
        model=exp.model.describe(),
        task_kind="regression",
    )
    x = np.linspace(-5, 5, 40, dtype=np.float32)[:, None]
    site = write_site(root / "site", [("a", x, np.sin(x)), ("b", x, 2 * np.cos(x))], kind="regression")
    corrupt = root / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 definitely not a checkpoint" * 20)
    labels = np.repeat(np.arange(5), 4)
    cls_site = write_site(root / "cls", [("c", np.zeros((20, 1, 4, 4), np.float32), labels)], kind="classification")
    ccfg = config_from_dict(
        {
            "task": {"name": "folder", "data_dir": str(cls_site), "shots": 1, "query": 1},
            "model": {"name": "mlp", "hidden": [8]},
        }
    )
    cexp = Experiment(ccfg)
    cls_ckpt = save_checkpoint(
        root / "classifier.pt",
        meta_params=cexp.initial_meta_params(),
        round_idx=0,
        config=to_dict(ccfg),
        model=cexp.model.describe(),
        task_kind="classification",
    )
    odd = root / "odd"
    (odd / "tasks").mkdir(parents=True)
    np.savez(odd / "tasks" / "weird.npz", inputs=x)
    return {"root": root, "ckpt": ckpt, "site": site, "corrupt": corrupt, "cls_ckpt": cls_ckpt, "odd": odd}


@pytest.mark.parametrize(
    ("case", "code", "needle"),
    [
        ("missing", CheckpointError.exit_code, "nope.pt' does not exist"),
        ("corrupt", CheckpointError.exit_code, "corrupt.pt' is corrupt or not a safe tensor-only file"),
        ("incompatible", CheckpointError.exit_code, "classifier.pt' was trained on classification tasks"),
        ("bad-compare", CheckpointError.exit_code, "corrupt.pt' is corrupt"),
        ("format", DataFormatError.exit_code, "weird.npz' must contain arrays 'x' and 'y'"),
        ("no-data", DataFormatError.exit_code, "no-such-site' does not exist"),
        ("too-few", DataFormatError.exit_code, "tasks/a.npz' has 40 examples; an episode of 35 support"),
    ],
)
def test_adapt_bad_input_gets_one_paragraph(
    files: dict[str, Path], case: str, code: int, needle: str, capsys: pytest.CaptureFixture[str]
) -> None:
    ckpt, site = str(files["ckpt"]), str(files["site"])
    args = {
        "missing": ["--checkpoint", str(files["root"] / "nope.pt"), "--data", site],
        "corrupt": ["--checkpoint", str(files["corrupt"]), "--data", site],
        "incompatible": ["--checkpoint", str(files["cls_ckpt"]), "--data", site],
        "bad-compare": ["--checkpoint", ckpt, "--data", site, "--compare", str(files["corrupt"])],
        "format": ["--checkpoint", ckpt, "--data", str(files["odd"])],
        "no-data": ["--checkpoint", ckpt, "--data", str(files["root"] / "no-such-site")],
        "too-few": ["--checkpoint", ckpt, "--data", site, "--shots", "35"],
    }[case]
    rc = main(["adapt", *args, "--out", str(files["root"] / f"out-{case}"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == code, err
    assert needle in err and err.startswith("fedmeta adapt: error:") and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


def test_predict_bad_input_gets_one_paragraph(files: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["predict", "--models", str(files["root"] / "nothing"), "--input", "x.npz"])
    err = capsys.readouterr().err
    assert rc == CheckpointError.exit_code and "nothing" in err and "Traceback" not in err
    out = files["root"] / "out-ok"
    assert (
        main(
            [
                "adapt",
                "--checkpoint",
                str(files["ckpt"]),
                "--data",
                str(files["site"]),
                "--out",
                str(out),
                "--episodes",
                "2",
                "--steps",
                "1",
                "--quiet",
            ]
        )
        == 0
    )
    capsys.readouterr()
    np.savez(files["root"] / "wide.npz", x=np.zeros((3, 2), np.float32))
    rc = main(["predict", "--models", str(out), "--task", "a", "--input", str(files["root"] / "wide.npz")])
    err = capsys.readouterr().err
    assert rc == DataFormatError.exit_code and "inputs of shape (3, 2) do not fit" in err and "Traceback" not in err
    (out / "models" / "a.pt").write_bytes(b"garbage")
    rc = main(["predict", "--models", str(out), "--task", "a", "--input", str(files["root"] / "wide.npz")])
    err = capsys.readouterr().err
    assert rc == CheckpointError.exit_code and "a.pt' is corrupt" in err and "Traceback" not in err


# ---------------------------------------------------------------------------------------------
# Glyphs: a site holding tasks from the held-out evaluation scripts

# Conv-4 with 16 filters, 8 tasks per meta-iteration, 80 iterations: about a minute on 2 cores.
# It lifts 5-way 1-shot held-out accuracy from chance (0.2) to roughly 0.55-0.6 after 3 steps,
# against roughly 0.35 for the same adaptation from a random initialization.
GLYPH_OVERRIDES = [
    "model.channels=16",
    "federation.clients_total=8",
    "federation.clients_per_round=4",
    "meta.tasks_per_client=2",
    "federation.rounds=80",
    "meta.outer_lr=0.005",
    "task.rotations=false",
    "eval.tasks=20",
    "eval.every=80",
]


@pytest.fixture(scope="module")
def glyph_run(tmp_path_factory: pytest.TempPathFactory, repo_root: Path) -> dict[str, Path]:
    from dataclasses import replace

    from fedmeta.centralized import run_centralized
    from fedmeta.config import load_config
    from fedmeta.datagen import make_sites

    root = tmp_path_factory.mktemp("glyphs")
    cfg = load_config(repo_root / "configs" / "glyphs.yaml", GLYPH_OVERRIDES)
    run_centralized(cfg, root / "maml")
    site = make_sites(replace(cfg, seed=3), 1, root / "sites", tasks_per_site=1, heldout_per_site=6)[0]
    return {"root": root, "checkpoint": root / "maml" / "checkpoint.pt", "site": site}


@pytest.mark.slow
def test_glyph_site_from_heldout_scripts_gains_from_the_meta_initialization(
    glyph_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    out = glyph_run["root"] / "adapted"
    rc = main(
        [
            "adapt",
            "--checkpoint",
            str(glyph_run["checkpoint"]),
            "--data",
            str(glyph_run["site"]),
            "--split",
            "heldout",
            "--episodes",
            "5",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    assert "5-way 1-shot" in capsys.readouterr().out
    report = json.loads((out / "adapt_report.json").read_text())
    assert report["site"]["kind"] == "classification" and len(report["site"]["tasks"]) == 6
    meta = report["initializations"]["meta"]["aggregate"]
    rand = report["initializations"]["random"]["aggregate"]
    assert meta["pre_adapt_accuracy"] < 0.3  # before adapting, labels are a fresh permutation: chance
    assert meta["post_adapt_accuracy"] > meta["pre_adapt_accuracy"] + 0.2
    assert (
        meta["post_adapt_accuracy"] - meta["post_adapt_accuracy_ci95"]
        > rand["post_adapt_accuracy"] + rand["post_adapt_accuracy_ci95"]
    )
    assert meta["post_adapt_loss"] < rand["post_adapt_loss"]


def _export_pngs(site: Path, dest: Path) -> Path:
    """The site's held-out glyph tasks as image folders (tasks/TASK/CLASS/*.png); glyphs are 8-bit."""
    from PIL import Image

    for f in sorted((site / "heldout").glob("*.npz")):
        with np.load(f) as d:
            x, y = d["x"], d["y"]
        for i, (img, label) in enumerate(zip(x, y)):
            folder = dest / "tasks" / f.stem / f"class-{label}"
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.rint(img[0] * 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return dest


@pytest.mark.slow
def test_glyph_image_folders_adapt_and_predict_with_class_names(
    glyph_run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    pngs = _export_pngs(glyph_run["site"], glyph_run["root"] / "png-site")
    out = glyph_run["root"] / "adapted-png"
    rc = main(
        [
            "adapt",
            "--checkpoint",
            str(glyph_run["checkpoint"]),
            "--data",
            str(pngs),
            "--episodes",
            "3",
            "--out",
            str(out),
            "--quiet",
        ]
    )
    assert rc == 0, capsys.readouterr().err
    report = json.loads((out / "adapt_report.json").read_text())
    meta = report["initializations"]["meta"]["aggregate"]
    assert meta["post_adapt_accuracy"] > report["initializations"]["random"]["aggregate"]["post_adapt_accuracy"]
    # predict a folder of a task's images (a class-balanced batch, as Conv-4's batch statistics expect)
    task = report["site"]["tasks"][0]
    flat = glyph_run["root"] / "to-predict"
    flat.mkdir()
    truth = []
    for cls in sorted((pngs / "tasks" / task).iterdir()):
        for img in sorted(cls.iterdir())[:4]:
            (flat / f"{len(truth):03d}.png").write_bytes(img.read_bytes())
            truth.append(cls.name)
    capsys.readouterr()
    rc = main(
        [
            "predict",
            "--models",
            str(out),
            "--task",
            task,
            "--input",
            str(flat),
            "--out",
            str(glyph_run["root"] / "pred.json"),
        ]
    )
    assert rc == 0, capsys.readouterr().err
    pred = json.loads((glyph_run["root"] / "pred.json").read_text())["predictions"]
    assert set(pred) <= {c.name for c in (pngs / "tasks" / task).iterdir()}
    # the personalized model was adapted on these very drawings: far above chance (0.2)
    assert np.mean([p == t for p, t in zip(pred, truth)]) > 0.5
