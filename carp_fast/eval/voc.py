"""Few-shot multi-label classification on Pascal VOC07 with linear SVMs (paper D.2).

The official ``evaluations/few-shot/eval_svm_voc.py`` (after PCL, Li et al. 2021):

- data: VOC2007 as distributed — ``JPEGImages/<id>.jpg`` and, per class,
  ``ImageSets/Main/<class>_trainval.txt`` / ``<class>_test.txt`` with lines
  ``<id> <label>``, label 1 (present), -1 (absent) or 0 (difficult);
  features of resize 256 + centre crop 224 views (``carp_fast.eval.data.split_batches``);
- features L2-normalised (``x / (||x|| + 1e-5)``);
- labels 0 (difficult) become -1 for training and testing, as the official code does
  (``difficult="ignore"`` drops them from each class's test AP instead, VOC's own rule);
- n shots: for every class, n of the trainval images where it is present, drawn at
  random; the 20 draws are concatenated (an image drawn for two classes appears twice);
- one-vs-rest ``sklearn.svm.LinearSVC(C=0.5, class_weight={1: 2, -1: 1})`` per class
  (squared hinge, dual, tol 1e-4, max_iter 2000, random_state 0), scored with its
  ``decision_function`` on the whole test set;
- AP per class as VOC's interpolated AP over all points (precision made monotone from
  the right, summed over the recall steps, the VOC2010+ rule; not the 11-point VOC07
  rule), mAP over the 20 classes in percent; n in {1, 2, 4, 8, 16}, 5 runs, mean and
  population std.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .fewshot import FewShotResult, repeat_draws
from .frozen import FrozenBackbone
from .report import Report, sizes

CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
SHOTS = (1, 2, 4, 8, 16)
RUNS = 5
COST = 0.5  # LinearSVC C of the official script
DIFFICULT = ("negative", "ignore")  # the first is the official code's


class VOCSplit(NamedTuple):
    """Image paths ``[N]`` and labels ``[N, 20]`` in {1, -1, 0} (0 = difficult)."""

    paths: list[str]
    labels: np.ndarray


def voc_root(root: str | os.PathLike) -> Path:
    """The VOC2007 folder: ``root`` itself, ``root/VOC2007`` or ``root/VOCdevkit/VOC2007``."""
    root = Path(root)
    for candidate in (root, root / "VOC2007", root / "VOCdevkit" / "VOC2007"):
        if (candidate / "ImageSets" / "Main").is_dir() and (candidate / "JPEGImages").is_dir():
            return candidate
    raise FileNotFoundError(
        f"{str(root)!r} is not a VOC2007 folder: expected JPEGImages/ and ImageSets/Main/ in it, "
        "in VOC2007/ or in VOCdevkit/VOC2007/"
    )


def read_voc_split(root: str | os.PathLike, split: str) -> VOCSplit:
    """Read ``ImageSets/Main/<class>_<split>.txt`` for the 20 classes.

    Args:
        root: see :func:`voc_root`.
        split: ``"trainval"`` or ``"test"`` (any split with class files works).

    Returns:
        :class:`VOCSplit`, images in the order of the first class file.

    Raises:
        FileNotFoundError: a missing class file or image.
        ValueError: class files that list different images, or a label not in {1, -1, 0}.
    """
    folder = voc_root(root)
    names: list[str] | None = None
    columns = []
    for cls in CLASSES:
        path = folder / "ImageSets" / "Main" / f"{cls}_{split}.txt"
        if not path.is_file():
            raise FileNotFoundError(f"VOC class file {str(path)!r} does not exist")
        rows = [line.split() for line in path.read_text().splitlines() if line.strip()]
        labels = {name: int(label) for name, label in rows}
        bad = sorted({v for v in labels.values()} - {1, -1, 0})
        if bad:
            raise ValueError(f"{path}: labels must be 1, -1 or 0 (difficult), got {bad}")
        if names is None:
            names = [name for name, _ in rows]
        elif set(labels) != set(names):
            raise ValueError(f"{path} lists other images than {CLASSES[0]}_{split}.txt")
        columns.append([labels[name] for name in names])
    paths = [str(folder / "JPEGImages" / f"{name}.jpg") for name in names]
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} VOC image(s) of {split} missing, e.g. {missing[:3]}")
    return VOCSplit(paths, np.array(columns, dtype=np.int64).T)


def sample_voc_few_shot(labels: np.ndarray, n: int, *, seed: int) -> np.ndarray:
    """Indices of n images per class where the class is present, concatenated class by class.

    Args:
        labels: ``[N, C]`` in {1, -1, 0}.
        n: images per class.
        seed: the draw.

    Returns:
        ``[n * C]`` indices; an image drawn for two classes appears twice (as the official
        code's ``convert_low_shot``).
    """
    if n < 1:
        raise ValueError(f"n (images per class) must be at least 1, got {n}")
    rng = np.random.default_rng(seed)
    picked = []
    for c in range(labels.shape[1]):
        present = np.flatnonzero(labels[:, c] > 0)
        if len(present) < n:
            raise ValueError(f"class {c} is present in {len(present)} images, fewer than n = {n}")
        picked.append(rng.permutation(present)[:n])
    return np.concatenate(picked)


def voc_ap(targets: np.ndarray, scores: np.ndarray) -> float:
    """VOC interpolated average precision (all points) of one class, in [0, 1].

    Args:
        targets: ``[N]``, positives > 0.
        scores: ``[N]`` decision scores, higher = more confident.

    Returns:
        the area under the precision-recall curve whose precision at each recall is the
        best precision at that recall or any higher one.
    """
    order = np.argsort(-np.asarray(scores, dtype=np.float64), kind="stable")
    hits = (np.asarray(targets)[order] > 0).astype(np.float64)
    if hits.sum() == 0:
        raise ValueError("targets hold no positive: AP is undefined")
    tp = np.cumsum(hits)
    precision = tp / np.arange(1, len(hits) + 1)
    recall = tp / hits.sum()
    envelope = np.maximum.accumulate(precision[::-1])[::-1]  # best precision at >= this recall
    steps = np.diff(np.concatenate([[0.0], recall]))  # recall gained at each rank
    return float((steps * envelope).sum())


def svm_map(
    train_features: torch.Tensor,
    train_labels: np.ndarray,
    test_features: torch.Tensor,
    test_labels: np.ndarray,
    *,
    cost: float = COST,
    difficult: str = DIFFICULT[0],
) -> tuple[float, list[float]]:
    """Train one LinearSVC per class and score its test AP.

    Args:
        train_features: ``[n_train, D]``; L2-normalised here.
        train_labels: ``[n_train, C]`` in {1, -1, 0}.
        test_features: ``[n_test, D]``.
        test_labels: ``[n_test, C]``.
        cost: the SVM's C.
        difficult: ``"negative"`` (the official code) or ``"ignore"`` (left out of the AP).

    Returns:
        ``(mAP in percent, [C] APs in percent)``.
    """
    from sklearn.svm import LinearSVC

    if difficult not in DIFFICULT:
        raise ValueError(f"difficult must be one of {DIFFICULT}, got {difficult!r}")
    x_train, x_test = _normalised(train_features), _normalised(test_features)
    y_train = np.where(train_labels == 0, -1, train_labels)
    aps = []
    for c in range(train_labels.shape[1]):
        if len(np.unique(y_train[:, c])) < 2:
            raise ValueError(f"class {c}: the training draw holds only one label value; draw more shots")
        svm = LinearSVC(C=cost, class_weight={1: 2, -1: 1}, intercept_scaling=1.0, penalty="l2",
                        loss="squared_hinge", tol=1e-4, dual=True, max_iter=2000, random_state=0)  # fmt: skip
        svm.fit(x_train, y_train[:, c])
        scores = svm.decision_function(x_test)  # [n_test]
        keep = test_labels[:, c] != 0 if difficult == "ignore" else slice(None)
        aps.append(100.0 * voc_ap(test_labels[keep, c], scores[keep]))
    return float(np.mean(aps)), aps


def voc_few_shot(
    train_features: torch.Tensor,
    train_labels: np.ndarray,
    test_features: torch.Tensor,
    test_labels: np.ndarray,
    *,
    shots: Sequence[int] = SHOTS,
    runs: int = RUNS,
    cost: float = COST,
    difficult: str = DIFFICULT[0],
    progress: bool = False,
) -> dict[int, FewShotResult]:
    """Few-shot VOC07 mAP for every n in ``shots``, over ``runs`` draws (run r: seed r).

    Args as :func:`svm_map`; ``train_*`` is the trainval pool the shots are drawn from.

    Returns:
        ``{n: FewShotResult(n, mean, std, runs)}`` of the mAP in percent, std the population
        std (as ``np.std``).
    """
    if runs < 1:
        raise ValueError(f"runs must be at least 1, got {runs}")
    if len(train_features) != len(train_labels) or len(test_features) != len(test_labels):
        raise ValueError("features and labels must have one row per image")

    def mean_ap(n: int, run: int) -> float:
        index = sample_voc_few_shot(train_labels, n, seed=run)
        return svm_map(train_features[torch.as_tensor(index)], train_labels[index],
                       test_features, test_labels, cost=cost, difficult=difficult)[0]  # fmt: skip

    return repeat_draws(mean_ap, shots, runs, description="VOC07 SVMs", progress=progress)


def _normalised(features: torch.Tensor) -> np.ndarray:
    """``[n, D]`` float64 numpy, rows divided by (norm + 1e-5) as the official code."""
    x = features.detach().cpu().double().numpy()
    return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-5)


# --- carp-fast eval voc07 -------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, help="VOC2007 folder (JPEGImages/, ImageSets/Main/), or VOCdevkit/ or its parent")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    parser.add_argument("--runs", type=int, default=RUNS)
    parser.add_argument("--cost", type=float, default=COST, help="LinearSVC C (official: 0.5)")
    parser.add_argument("--difficult", choices=DIFFICULT, default=DIFFICULT[0], help="difficult (0) labels: negatives as the official code, or left out of the AP")


def run_from_args(args: argparse.Namespace, backbone: FrozenBackbone) -> Report:
    """mAP mean and std over ``--runs`` draws for every n of ``--shots``, on resize + centre
    crop views (224 / 256 unless ``--size`` / ``--resize``)."""
    splits = {name: read_voc_split(args.data, name) for name in ("trainval", "test")}
    size, resize = args.size or 224, args.resize or 256
    settings, (trainval, test) = backbone.file_features(
        {f"voc07-{name}": split.paths for name, split in splits.items()},
        {"data": str(Path(args.data).resolve()), "size": size, "resize": resize},
        backbone.centre_crops(size, resize),
    )
    results = voc_few_shot(trainval.features, splits["trainval"].labels, test.features, splits["test"].labels,
                           shots=args.shots, runs=args.runs, cost=args.cost, difficult=args.difficult,
                           progress=backbone.progress)  # fmt: skip
    rows = [{"n": r.n, "mAP_mean": r.mean, "mAP_std": r.std, "runs": r.runs} for r in results.values()]
    protocol = {"variant": "paper", "classifier": "LinearSVC per class", "cost": args.cost,
                "class_weight": {"1": 2, "-1": 1}, "features": "L2-normalised", "ap": "VOC interpolated, all points",
                "difficult": args.difficult, "shots": args.shots, "runs": args.runs}  # fmt: skip
    return Report("few-shot VOC07 (linear SVMs)", rows, {**settings, **sizes(trainval, test), **protocol})
