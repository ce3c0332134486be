"""`carp-fast eval ...` end to end on a checkpoint and a small fake image set."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from carp_fast.backbones import build_backbone
from carp_fast.eval import checkpoints
from carp_fast.eval.cli import main
from carp_fast.pipelines.sources import FASHION_MNIST_ROOT

COLOURS = {"red": (200, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 200)}


class _Network(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = build_backbone("resnet18_small")
        self.head = nn.Linear(512, 8)


class _StudentTeacher(nn.Module):  # keys student.backbone.*, teacher.backbone.*, ...
    def __init__(self):
        super().__init__()
        self.student, self.teacher = _Network(), _Network()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("run") / "model.pth"
    config = {"arch": "resnet18_small", "n_prototypes": 16}
    torch.save({"model": _StudentTeacher().state_dict(), "config": config}, path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """ImageNet layout: train/<class>/*.png (8 per class), val/<class>/*.png (4 per class)."""
    root = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for split, count in (("train", 8), ("val", 4)):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (20, 20, 3)), 0, 255)
                Image.fromarray(pixels.astype(np.uint8)).save(root / split / name / f"{i}.png")
    return root


def _run(tmp_path, *argv, backend="torchvision"):
    common = ["--cache-dir", str(tmp_path / "cache"), "--no-progress", "--backend", backend, "--workers", "1"]
    return main([*argv, *common])


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
def test_knn_end_to_end(tmp_path, checkpoint, image_folder, capsys, backend):
    out = tmp_path / "knn.json"
    rc = _run(tmp_path, "knn", "--checkpoint", str(checkpoint), "--data", str(image_folder),
              "--size", "16", "--resize", "16", "--k", "1", "5", "--out", str(out), backend=backend)  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["protocol"] == "knn"
    assert [r["k"] for r in record["results"]] == [1, 5]
    for result in record["results"]:
        # Three flat colours: even random features separate them, unless images and labels
        # were paired wrongly on the way (chance is 33 %).
        assert 90.0 <= result["top1"] <= result["top5"] <= 100.0
        assert result["settings"]["checkpoint"] == str(checkpoint.resolve())
    settings = record["settings"]
    assert settings["which"] == "teacher" and settings["size"] == 16 and settings["n"] == [24, 12]
    assert settings["backend"] == backend
    assert settings["feature_dim"] == 512 and settings["temperature"] == 0.07
    assert "k-NN" in capsys.readouterr().out  # the rich table
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 2  # train and test features


def test_second_run_reads_the_cache(tmp_path, checkpoint, image_folder, monkeypatch):
    args = ["knn", "--checkpoint", str(checkpoint), "--data", str(image_folder),
            "--size", "16", "--resize", "16", "--k", "3", "--out", str(tmp_path / "a.json")]  # fmt: skip
    assert _run(tmp_path, *args) == 0

    def no_loading(*_, **__):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(checkpoints, "load_backbone", no_loading)
    assert _run(tmp_path, *args[:-1], str(tmp_path / "b.json")) == 0
    first, second = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    assert first["results"][0]["top1"] == second["results"][0]["top1"]


def test_kmeans_end_to_end_student(tmp_path, checkpoint, image_folder):
    out = tmp_path / "kmeans.json"
    rc = _run(tmp_path, "kmeans", "--checkpoint", str(checkpoint), "--which", "student",
              "--data", str(image_folder), "--size", "16", "--resize", "16",
              "--nredo", "2", "--out", str(out))  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    (result,) = record["results"]
    assert set(result) >= {"nmi", "ami", "ari", "settings"}
    assert 0.0 <= result["nmi"] <= 1.0
    assert record["settings"]["which"] == "student" and record["settings"]["nredo"] == 2


def test_bad_input_exits_with_a_message(tmp_path, checkpoint, image_folder, capsys):
    rc = _run(tmp_path, "knn", "--checkpoint", str(checkpoint), "--data", str(image_folder),
              "--size", "16", "--k", "100")  # fmt: skip
    assert rc == 2
    assert "k must be between 1 and the bank size n_train = 24" in capsys.readouterr().err
    assert _run(tmp_path, "knn", "--checkpoint", str(tmp_path / "missing.pth")) == 2
    assert _run(tmp_path, "knn", "--checkpoint", str(checkpoint), "--arch", "resnet50",
                "--data", str(image_folder)) == 2  # fmt: skip
    assert "trained with arch='resnet18_small'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown --which
        main(["knn", "--checkpoint", str(checkpoint), "--which", "ema"])


def test_retrieval_and_copy_detection(tmp_path, checkpoint, image_folder):
    # Queries: the val images; database: the train images; positives: same colour.
    val = sorted((image_folder / "val").rglob("*.png"))
    train = sorted((image_folder / "train").rglob("*.png"))
    database = [str(p.relative_to(image_folder)) for p in train]
    colour = [p.parent.name for p in train]
    gnd_copy, gnd_retrieval = [], []
    for query in val:
        same = [i for i, c in enumerate(colour) if c == query.parent.name]
        gnd_copy.append({"ok": same})
        gnd_retrieval.append({"easy": same[:4], "hard": same[4:], "junk": []})
    for name, gnd in (("copydetection", gnd_copy), ("retrieval", gnd_retrieval)):
        spec = {"queries": [str(p.relative_to(image_folder)) for p in val], "database": database, "gnd": gnd}
        (image_folder / f"{name}.json").write_text(json.dumps(spec))
        out = tmp_path / f"{name}.json"
        rc = _run(tmp_path, name, "--checkpoint", str(checkpoint), "--size", "16",
                  "--ground-truth", str(image_folder / f"{name}.json"), "--out", str(out))  # fmt: skip
        assert rc == 0
        (result,) = json.loads(out.read_text())["results"]
        key = "mAP" if name == "copydetection" else "mAP_medium"
        # Same-colour positives are each query's nearest images, unless the features were
        # paired with the wrong database positions (then about 33 %).
        assert 90.0 <= result[key] <= 100.0


@pytest.mark.skipif(not Path(FASHION_MNIST_ROOT).exists(), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_subset(tmp_path, checkpoint):
    out = tmp_path / "fm.json"
    rc = _run(tmp_path, "knn", "--checkpoint", str(checkpoint), "--data", "fashion-mnist",
              "--train-limit", "300", "--test-limit", "100", "--k", "20", "--out", str(out))  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["settings"]["n"] == [300, 100] and record["settings"]["size"] == 28
    assert record["results"][0]["top1"] > 30.0  # 10 classes: chance is 10 %


def test_python_dash_m(checkpoint):
    done = subprocess.run(
        [sys.executable, "-m", "carp_fast.eval", "knn", "--help"],
        capture_output=True, text=True, cwd=Path(__file__).parents[1],
    )  # fmt: skip
    assert done.returncode == 0 and "--temperature" in done.stdout


@pytest.mark.parametrize(
    "protocol, extra, key",
    [
        ("linear", ["--epochs", "5"], "top1"),
        ("fewshot", ["--shots", "1", "2", "--seeds", "2", "--epochs", "5"], "top1_mean"),
    ],
)
def test_probes_on_freshly_extracted_features(tmp_path, checkpoint, image_folder, protocol, extra, key):
    # --no-cache: the probe trains on tensors straight out of extraction.
    out = tmp_path / f"{protocol}.json"
    rc = _run(tmp_path, protocol, "--checkpoint", str(checkpoint), "--data", str(image_folder),
              "--size", "16", "--resize", "16", "--no-cache", "--out", str(out), *extra)  # fmt: skip
    assert rc == 0
    results = json.loads(out.read_text())["results"]
    assert all(0.0 <= r[key] <= 100.0 for r in results)
    assert not (tmp_path / "cache").exists()
