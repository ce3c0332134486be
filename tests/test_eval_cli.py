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


@pytest.mark.parametrize("trained_on_this_data", [True, False])
def test_the_view_defaults_to_the_one_the_run_evaluated_with(tmp_path, image_folder, trained_on_this_data):
    """A project checkpoint names the run's eval size and resize (the embedded default: 28 px
    images shrunk to 18 px); without --size / --resize, the CLI measures that view when the
    checkpoint was trained on --data, and the data set's defaults otherwise."""
    torch.manual_seed(0)
    path = tmp_path / "checkpoint.pth"
    data = str(image_folder) if trained_on_this_data else str(tmp_path / "other")
    settings = {"arch": "resnet18_small", "data": data, "eval_size": 12, "eval_resize": 14}
    torch.save({"model": _StudentTeacher().state_dict(), "settings": settings}, path)
    out = tmp_path / "knn.json"
    assert _run(tmp_path, "knn", "--checkpoint", str(path), "--data", str(image_folder), "--k", "1", "--out", str(out)) == 0
    view = {key: json.loads(out.read_text())["settings"][key] for key in ("size", "resize")}
    assert view == ({"size": 12, "resize": 14} if trained_on_this_data else {"size": 224, "resize": 256})
    # --size (or --resize) given: the command line's view, whatever the checkpoint says.
    assert _run(tmp_path, "knn", "--checkpoint", str(path), "--data", str(image_folder), "--size", "16",
                "--k", "1", "--out", str(out)) == 0  # fmt: skip
    assert json.loads(out.read_text())["settings"]["size"] == 16


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


def test_a_run_loads_the_weights_once_and_leaves_the_arguments_alone(tmp_path, checkpoint, image_folder, monkeypatch):
    """Two cache misses (train, test) share one load of the weights; what the run resolves
    (the arch read from the checkpoint, the view) lives on the FrozenBackbone, not on args."""
    from carp_fast.eval.cli import build_parser
    from carp_fast.eval.frozen import FrozenBackbone

    loads = []
    load_backbone = checkpoints.load_backbone
    monkeypatch.setattr(checkpoints, "load_backbone", lambda *a, **kw: loads.append(a) or load_backbone(*a, **kw))
    args = build_parser().parse_args(["knn", "--checkpoint", str(checkpoint), "--data", str(image_folder), "--size", "16",
                                      "--k", "1", "--no-cache", "--no-progress", "--backend", "torchvision", "--workers", "1"])  # fmt: skip
    parsed = dict(vars(args))
    backbone = FrozenBackbone.from_args(args)
    report = args.run(args, backbone)
    assert vars(args) == parsed
    assert backbone.arch == "resnet18_small" and report.settings["arch"] == "resnet18_small"
    assert len(loads) == 1 and report.settings["n"] == [24, 12]


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


def test_k_larger_than_the_bank_is_skipped_with_a_note(tmp_path, checkpoint, image_folder, capsys):
    out = tmp_path / "knn.json"
    rc = _run(tmp_path, "knn", "--checkpoint", str(checkpoint), "--data", str(image_folder),
              "--size", "16", "--k", "5", "100", "--out", str(out))  # fmt: skip
    assert rc == 0
    assert "skipping k = [100], larger than the bank of n_train = 24" in capsys.readouterr().err
    record = json.loads(out.read_text())
    assert [r["k"] for r in record["results"]] == [5] and record["settings"]["k_skipped"] == [100]


def test_bad_input_exits_with_a_message(tmp_path, checkpoint, image_folder, capsys):
    rc = _run(tmp_path, "knn", "--checkpoint", str(checkpoint), "--data", str(image_folder),
              "--size", "16", "--k", "100")  # fmt: skip
    assert rc == 2
    assert "every k in [100] is outside 1..n_train = 24" in capsys.readouterr().err
    assert _run(tmp_path, "knn", "--checkpoint", str(tmp_path / "missing.pth")) == 2
    assert _run(tmp_path, "knn", "--checkpoint", str(checkpoint), "--arch", "resnet50",
                "--data", str(image_folder)) == 2  # fmt: skip
    assert "trained with arch='resnet18_small'" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse rejects an unknown --which
        main(["knn", "--checkpoint", str(checkpoint), "--which", "ema"])


def test_the_console_command_exits_2_on_bad_input(tmp_path):
    """`carp-fast eval ...` passes eval's exit status on (it used to exit 0 after the error line)."""
    from carp_fast.cli import main as console

    with pytest.raises(SystemExit) as stop:
        console(["eval", "knn", "--checkpoint", str(tmp_path / "missing.pth"), "--out", str(tmp_path / "r.jsonl")])
    assert stop.value.code == 2


def test_a_file_that_is_not_a_checkpoint_gets_one_line(tmp_path, checkpoint, image_folder, capsys):
    notes = tmp_path / "notes.txt"
    notes.write_text("hello, these are my notes\n")
    truncated = tmp_path / "truncated.pth"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    for path in (notes, truncated):
        capsys.readouterr()
        assert _run(tmp_path, "knn", "--checkpoint", str(path), "--data", str(image_folder), "--size", "16") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"{str(path)!r} is not a readable torch checkpoint" in err[0]


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
        rc = _run(tmp_path, name, "--checkpoint", str(checkpoint), "--imsize", "16",
                  "--ground-truth", str(image_folder / f"{name}.json"), "--out", str(out))  # fmt: skip
        assert rc == 0
        record = json.loads(out.read_text())
        assert record["settings"]["variant"] == "paper" and record["settings"]["imsize"] == 16
        (result,) = record["results"]
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
        ("linear", ["--protocol", "fast", "--epochs", "5"], "top1"),
        ("linear", ["--epochs", "2", "--lrs", "0.1", "1.0", "--probe-batch-size", "8"], "top1"),
        ("fewshot", ["--shots", "1", "2", "--seeds", "2", "--epochs", "5"], "top1_mean"),
        ("fewshot", ["--protocol", "fast", "--shots", "1", "--seeds", "2", "--epochs", "5"], "top1_mean"),
    ],
)
def test_probes_on_freshly_extracted_features(tmp_path, checkpoint, image_folder, protocol, extra, key):
    # --no-cache: the probe trains on tensors straight out of extraction.
    out = tmp_path / f"{protocol}.json"
    rc = _run(tmp_path, protocol, "--checkpoint", str(checkpoint), "--data", str(image_folder),
              "--size", "16", "--resize", "16", "--no-cache", "--out", str(out), *extra)  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    assert all(0.0 <= r[key] <= 100.0 for r in record["results"])
    variant = "fast" if "fast" in extra else "paper"
    assert record["protocol"] == protocol and record["settings"]["variant"] == variant
    if protocol == "linear" and variant == "paper":  # 2 lrs x 2 weight decays x 2 optimisers
        assert record["settings"]["n_heads"] == 8 and len(record["settings"]["grid"]) == 8
    assert not (tmp_path / "cache").exists()


def test_kmeans_subset_file_fits_on_the_listed_images(tmp_path, checkpoint):
    # ImageNet naming: train/<wnid>/<wnid>_<n>.JPEG; the list names files, one per line.
    rng = np.random.default_rng(1)
    for split, count in (("train", 6), ("val", 3)):
        for wnid, colour in zip(("n01440764", "n01443537"), ((200, 30, 30), (30, 30, 200))):
            (tmp_path / "imagenet" / split / wnid).mkdir(parents=True)
            for i in range(count):
                pixels = np.clip(np.array(colour) + rng.normal(0, 20, (20, 20, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(tmp_path / "imagenet" / split / wnid / f"{wnid}_{i}.JPEG", format="JPEG")
    subset = tmp_path / "10percent.txt"
    subset.write_text("n01440764_0.JPEG\nn01440764_3.JPEG\nn01443537_1.JPEG\nn01443537_5.JPEG\n")
    out = tmp_path / "km.json"
    rc = _run(tmp_path, "kmeans", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "imagenet"),
              "--size", "16", "--resize", "16", "--nredo", "2", "--subset-file", str(subset), "--out", str(out))  # fmt: skip
    assert rc == 0
    settings = json.loads(out.read_text())["settings"]
    assert settings["n"] == [4, 6] and settings["preprocess"] == "standardize"
    assert settings["variant"] == "custom"  # nredo 2: not the paper's settings
    assert settings["subset_file"] == str(subset.resolve())
    subset.write_text("n09999999_0.JPEG\n")
    assert _run(tmp_path, "kmeans", "--checkpoint", str(checkpoint), "--data", str(tmp_path / "imagenet"),
                "--size", "16", "--subset-file", str(subset)) == 2  # fmt: skip


def test_a_data_set_with_one_class_is_warned_about_in_one_line(tmp_path, checkpoint, image_folder, capsys):
    """A k-NN on one class scores 100 % whatever the features: said, in one line."""
    import shutil

    one = tmp_path / "one"
    for split in ("train", "val"):
        shutil.copytree(image_folder / split / "red", one / split / "red")
    assert _run(tmp_path, "knn", "--checkpoint", str(checkpoint), "--data", str(one), "--size", "16", "--k", "1") == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(warning) == 1 and "has a single class in train (8 images) and test (4 images) (label 0)" in warning[0]
    assert _run(tmp_path, "knn", "--checkpoint", str(checkpoint), "--data", str(image_folder), "--size", "16", "--k", "1") == 0
    assert "single class" not in capsys.readouterr().err
