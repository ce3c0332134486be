"""Few-shot VOC07: the distributed layout, PCL's sampling, LinearSVC scores and VOC's AP."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from carp_fast.eval.voc import CLASSES, read_voc_split, sample_voc_few_shot, svm_map, voc_ap, voc_few_shot


def _interpolated_ap(targets, scores):
    """VOC all-point AP written differently: for each positive (in score order), the best
    precision at its rank or any later rank, averaged over all positives."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    hits = [targets[i] > 0 for i in order]
    precisions = [sum(hits[: r + 1]) / (r + 1) for r in range(len(hits))]
    total = sum(hits)
    return sum(max(precisions[r:]) for r in range(len(hits)) if hits[r]) / total


def test_voc_ap_by_hand_and_against_the_definition():
    # ranks: + - + - -  -> precisions 1, 1/2, 2/3; interpolated: 1 and 2/3 -> (1 + 2/3) / 2
    assert voc_ap(np.array([1, -1, 1, -1, -1]), np.array([5.0, 4, 3, 2, 1])) == pytest.approx(5 / 6)
    rng = np.random.default_rng(0)
    for _ in range(20):
        targets = rng.choice([1, -1], size=30)
        targets[0] = 1
        scores = rng.normal(size=30)
        assert voc_ap(targets, scores) == pytest.approx(_interpolated_ap(targets, scores))


def _features(labels, rng, dim=64):
    """Features with a direction per class, so the SVMs have something to find."""
    directions = np.random.default_rng(99).normal(size=(len(CLASSES), dim))  # shared by every split
    return torch.tensor((labels > 0) @ directions + rng.normal(scale=0.5, size=(len(labels), dim)))


def _labels(n, rng):
    labels = rng.choice([1, -1, -1, -1, 0], size=(n, len(CLASSES)))
    labels[np.arange(n), np.arange(n) % len(CLASSES)] = 1  # every class present often enough
    return labels


def test_svm_map_equals_ap_of_sklearn_scores():
    from sklearn.svm import LinearSVC

    rng = np.random.default_rng(1)
    train_y, test_y = _labels(60, rng), _labels(50, rng)
    train_x, test_x = _features(train_y, rng), _features(test_y, rng)
    mean_ap, aps = svm_map(train_x, train_y, test_x, test_y)
    x = train_x.numpy() / (np.linalg.norm(train_x.numpy(), axis=1, keepdims=True) + 1e-5)
    xt = test_x.numpy() / (np.linalg.norm(test_x.numpy(), axis=1, keepdims=True) + 1e-5)
    for c in range(len(CLASSES)):
        svm = LinearSVC(C=0.5, class_weight={1: 2, -1: 1}, max_iter=2000, random_state=0)
        svm.fit(x, np.where(train_y[:, c] == 1, 1, -1))  # difficult (0) -> negative
        scores = svm.decision_function(xt)
        assert aps[c] == pytest.approx(100 * _interpolated_ap(np.where(test_y[:, c] == 1, 1, -1), scores))
    assert mean_ap == pytest.approx(np.mean(aps)) and mean_ap > 50.0
    # Difficult images left out of the AP: a different number.
    assert svm_map(train_x, train_y, test_x, test_y, difficult="ignore")[0] != pytest.approx(mean_ap)


@pytest.mark.parametrize("n", [1, 2])
def test_sampling_draws_n_positives_per_class(n):
    labels = _labels(60, np.random.default_rng(2))
    index = sample_voc_few_shot(labels, n, seed=3)
    assert len(index) == n * len(CLASSES)
    for c in range(len(CLASSES)):
        assert (labels[index[c * n : (c + 1) * n], c] == 1).all()
    assert not np.array_equal(index, sample_voc_few_shot(labels, n, seed=4))


def test_few_shot_runs_mean_and_std():
    rng = np.random.default_rng(5)
    train_y, test_y = _labels(60, rng), _labels(40, rng)
    results = voc_few_shot(_features(train_y, rng), train_y, _features(test_y, rng), test_y, shots=(1, 2), runs=3)
    for n, r in results.items():
        assert len(r.runs) == 3 and r.mean == pytest.approx(np.mean(r.runs)) and r.std == pytest.approx(np.std(r.runs))


def _write_voc(root, rng):
    """VOC2007 as distributed: JPEGImages/<id>.jpg, ImageSets/Main/<class>_<split>.txt."""
    main = root / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main"
    main.mkdir(parents=True)
    images = root / "VOCdevkit" / "VOC2007" / "JPEGImages"
    images.mkdir()
    splits = {"trainval": _labels(40, rng), "test": _labels(20, rng)}
    start = 0
    for split, labels in splits.items():
        ids = [f"{start + i:06d}" for i in range(len(labels))]
        start += len(labels)
        for c, cls in enumerate(CLASSES):
            (main / f"{cls}_{split}.txt").write_text("".join(f"{i} {int(v):2d}\n" for i, v in zip(ids, labels[:, c])))
        for i, row in zip(ids, labels):
            colour = (np.array([37, 91, 151]) * (row > 0)[:3]) % 255
            pixels = np.clip(colour + rng.normal(0, 20, (20, 24, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(images / f"{i}.jpg")
    return splits


def test_read_voc_layout(tmp_path):
    splits = _write_voc(tmp_path, np.random.default_rng(6))
    test = read_voc_split(tmp_path, "test")
    np.testing.assert_array_equal(test.labels, splits["test"])
    assert test.paths[0].endswith("VOC2007/JPEGImages/000040.jpg")
    (tmp_path / "VOCdevkit" / "VOC2007" / "ImageSets" / "Main" / "cat_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="cat_test.txt"):
        read_voc_split(tmp_path, "test")


def test_voc07_cli(tmp_path):
    from carp_fast.eval.cli import main
    from tests.test_eval_cli import _StudentTeacher  # default init: finite features

    _write_voc(tmp_path, np.random.default_rng(7))
    torch.manual_seed(0)
    torch.save({"model": _StudentTeacher().state_dict(), "config": {"arch": "resnet18_small"}},
               tmp_path / "model.pth")  # fmt: skip
    out = tmp_path / "voc.json"
    rc = main(["voc07", "--checkpoint", str(tmp_path / "model.pth"), "--data", str(tmp_path), "--size", "16",
               "--resize", "16", "--shots", "1", "--runs", "2", "--no-cache", "--no-progress", "--backend",
               "torchvision", "--workers", "0", "--out", str(out)])  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["protocol"] == "voc07" and record["settings"]["cost"] == 0.5
    (row,) = record["results"]
    assert row["n"] == 1 and len(row["runs"]) == 2 and 0.0 <= row["mAP_mean"] <= 100.0
