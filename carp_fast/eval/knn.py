"""Weighted k-nearest-neighbour classification on frozen features (DINO protocol).

The protocol of facebookresearch/dino ``eval_knn.py`` (Caron et al., 2021), which the
CARP paper uses for its k-NN numbers (section 5, appendix D): features are L2-normalised,
similarity is the cosine (a dot product of unit vectors), the k most similar training
features vote for their label with weight ``exp(sim / T)``, T = 0.07, and the class with
the largest summed weight wins. The paper reports k = 20; DINO also sweeps
k in {10, 20, 100, 200}.

Memory: the test set is processed in chunks, so only a ``[chunk, n_train]`` block of the
similarity matrix exists at once (a 1.28M x 2048 ImageNet bank never needs the full
``[n_test, n_train]`` matrix). On a machine with CUDA the bank is moved to the GPU and the
matrix products run there; otherwise everything runs on the CPU.

This module imports only torch (and the torch-only input checks of ``features``, and
``report``'s record type): the training loop's k-NN monitor imports it. The end of the
module is ``carp-fast eval knn``: its options and its run.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any, Iterable, Iterator, NamedTuple, Sequence

import torch
import torch.nn.functional as F

from .features import check_labelled, check_same_dim
from .frozen import FrozenBackbone
from .report import Report, sizes

KS = (10, 20, 100, 200)  # DINO's sweep; 20 is the number the paper reports
TEMPERATURE = 0.07
# Elements of one [chunk, n_train] similarity block: 2**27 fp32 = 512 MiB.
_SIMILARITY_BUDGET = 2**27


class KNNResult(NamedTuple):
    """Top-1 and top-5 accuracy of a k-NN classifier, in percent."""

    top1: float
    top5: float


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = TEMPERATURE,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Class scores of a weighted k-NN vote (DINO ``knn_classifier``).

    Args:
        train_features: the bank, ``[n_train, D]``; L2-normalised here (a no-op if it
            already is).
        train_labels: ``[n_train]`` integer labels in ``[0, num_classes)``.
        test_features: ``[n_test, D]``; L2-normalised here.
        k: neighbours per test feature, ``1 <= k <= n_train``.
        temperature: T in the vote weight ``exp(sim / T)``.
        num_classes: C; defaults to ``max(train_labels) + 1``.
        device: where the similarity runs; defaults to CUDA when available, else the
            device of ``test_features``.
        chunk_size: test rows per similarity block; defaults to a 512 MiB block.

    Returns:
        scores ``[n_test, C]`` on the device of ``test_features``: for each test feature
        and class, the sum of ``exp(sim / T)`` over its k neighbours with that label.
        Computed in float64 when the features are float64, otherwise float32.
    """
    num_classes = _check_inputs(train_features, train_labels, test_features, k, temperature, num_classes)
    device = _compute_device(device, test_features)
    scores = [
        _vote(sims, neighbour_labels, temperature, num_classes)
        for sims, neighbour_labels in _neighbours(
            train_features, train_labels, test_features, k, device, chunk_size
        )
    ]
    return torch.cat(scores).to(test_features.device)


def knn_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    **options: Any,
) -> KNNResult:
    """Top-1 / top-5 accuracy (percent) of :func:`knn_classify` against ``test_labels``.

    Args:
        test_labels: ``[n_test]`` integer labels; the other arguments as in
            :func:`knn_classify`.
        options: ``temperature``, ``num_classes``, ``device``, ``chunk_size`` of
            :func:`knn_accuracies` (its defaults).

    Returns:
        ``KNNResult(top1, top5)``. Top-5 counts a hit only for a class that received at
        least one vote (at k < 5 fewer than 5 classes can be voted for).
    """
    return knn_accuracies(train_features, train_labels, test_features, test_labels, ks=(k,), **options)[k]


def knn_accuracies(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    ks: Sequence[int] = KS,
    temperature: float = TEMPERATURE,
    num_classes: int | None = None,
    device: torch.device | str | None = None,
    chunk_size: int | None = None,
) -> dict[int, KNNResult]:
    """:func:`knn_accuracy` for several k with one pass over the bank.

    The ``max(ks)`` nearest neighbours are found once; each k votes with the first k of
    them (top-k is sorted, so these are exactly the k nearest).

    Returns:
        ``{k: KNNResult(top1, top5)}`` for every k in ``ks``.
    """
    ks = tuple(int(k) for k in ks)
    if not ks:
        raise ValueError("ks must hold at least one k, got an empty sequence")
    check_labelled(test_features, test_labels, "test")
    num_classes = _check_inputs(
        train_features, train_labels, test_features, max(ks), temperature, num_classes
    )
    device = _compute_device(device, test_features)
    test_labels = test_labels.to(device=device, dtype=torch.long)  # [n_test], moved once
    # hits[i] = (top-1, top-5) hit counts for ks[i], summed on the device: no host sync
    # per chunk, one read at the end.
    hits = torch.zeros(len(ks), 2, dtype=torch.long, device=device)
    start = 0
    for sims, neighbour_labels in _neighbours(
        train_features, train_labels, test_features, max(ks), device, chunk_size
    ):
        targets = test_labels[start : start + len(sims)].view(-1, 1)  # [chunk, 1]
        start += len(sims)
        for i, k in enumerate(ks):
            scores = _vote(sims[:, :k], neighbour_labels[:, :k], temperature, num_classes)
            top_scores, predictions = scores.topk(min(5, num_classes), dim=1)  # [chunk, 5]
            # A class with no votes is never a hit: DINO's sort breaks ties among the
            # zero-score classes arbitrarily, which makes top-5 at small k depend on it.
            correct = predictions.eq(targets) & (top_scores > 0)
            hits[i, 0] += correct[:, 0].sum()
            hits[i, 1] += correct.any(dim=1).sum()
    n = len(test_features)
    counts = hits.tolist()  # the one host sync
    return {k: KNNResult(100.0 * top1 / n, 100.0 * top5 / n) for k, (top1, top5) in zip(ks, counts)}


def _check_inputs(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    temperature: float,
    num_classes: int | None,
) -> int:
    """Validate shapes and arguments; return the number of classes C."""
    check_labelled(train_features, train_labels, "train")
    check_same_dim(train_features, test_features)
    if not 1 <= k <= len(train_features):
        raise ValueError(
            f"k must be between 1 and the bank size n_train = {len(train_features)}, got {k}"
        )
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    largest = int(train_labels.max())  # the bank is non-empty (checked above)
    if num_classes is None:
        return largest + 1
    if largest >= num_classes:
        raise ValueError(
            f"num_classes = {num_classes} but train_labels holds label {largest}; "
            "pass num_classes > max(train_labels) or None"
        )
    return num_classes


def _compute_device(device: torch.device | str | None, test_features: torch.Tensor) -> torch.device:
    """``device``, else CUDA when available, else the device of ``test_features``."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else test_features.device
    return torch.device(device)


def _neighbours(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    k: int,
    device: torch.device,
    chunk_size: int | None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield, per chunk of test rows, the k largest cosine similarities ``[chunk, k]``
    (sorted, largest first) and the labels of those neighbours ``[chunk, k]``, both on
    ``device``."""
    dtype = torch.float64 if train_features.dtype == torch.float64 else torch.float32
    bank = F.normalize(train_features.to(device=device, dtype=dtype), dim=1)  # [n_train, D]
    labels = train_labels.to(device=device, dtype=torch.long)
    if chunk_size is None:
        chunk_size = max(1, _SIMILARITY_BUDGET // max(1, len(bank)))
    for start in range(0, len(test_features), chunk_size):
        queries = test_features[start : start + chunk_size].to(device=device, dtype=dtype)
        queries = F.normalize(queries, dim=1)  # [chunk, D]
        sims, idx = (queries @ bank.T).topk(k, dim=1, largest=True, sorted=True)
        yield sims, labels[idx]


def _vote(
    sims: torch.Tensor, neighbour_labels: torch.Tensor, temperature: float, num_classes: int
) -> torch.Tensor:
    """Scores ``[chunk, C]``: sum of ``exp(sim / T)`` per label over the neighbours.

    Args:
        sims: ``[chunk, k]`` cosine similarities of the neighbours.
        neighbour_labels: ``[chunk, k]`` their labels.
    """
    weights = (sims / temperature).exp()  # [chunk, k]
    scores = torch.zeros(len(sims), num_classes, dtype=sims.dtype, device=sims.device)
    return scores.scatter_add_(1, neighbour_labels, weights)


def loader_knn(
    model: torch.nn.Module,
    bank: Iterable[tuple[torch.Tensor, torch.Tensor]],
    queries: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    k: int = 20,
    temperature: float = TEMPERATURE,
    device: torch.device | str | None = None,
) -> KNNResult:
    """:func:`knn_accuracy` of ``model``'s features: each image of ``queries`` voted on by the
    labelled ``bank`` (loaders of ``(images [N, 3, S, S], labels [N])``), k at most the bank's size.

    ``model`` maps images to features ``[N, D]`` (a backbone, or ``nn.Flatten()`` for the raw
    pixels); it runs in eval mode on ``device`` (default: CUDA when available), as in
    :func:`~carp_fast.eval.features.extract_features`.
    """
    from .features import extract_features

    train = extract_features(model, bank, device=device, progress=False)
    test = extract_features(model, queries, device=device, progress=False)
    return knn_accuracy(train.features, train.labels, test.features, test.labels,
                        k=min(k, len(train.labels)), temperature=temperature)


# --- carp-fast eval knn ---------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--k", type=int, nargs="+", default=list(KS), help="neighbours (paper reports 20)")
    parser.add_argument("--temperature", type=float, default=TEMPERATURE, help="T in the vote weight exp(sim / T)")


def run_from_args(args: argparse.Namespace, backbone: FrozenBackbone) -> Report:
    """Accuracy at every ``--k`` that fits the bank of training features (a note names the others)."""
    settings, (train, test) = backbone.labelled_features(args)
    n_train = len(train.labels)
    ks = [k for k in args.k if 1 <= k <= n_train]
    skipped = [k for k in args.k if k not in ks]
    if skipped:  # a small bank: report the k that fit rather than nothing
        print(f"carp-fast eval knn: note: skipping k = {skipped}, larger than the bank of n_train = {n_train} "
              "training features (or below 1)", file=sys.stderr)  # fmt: skip
    if not ks:
        raise ValueError(f"every k in {args.k} is outside 1..n_train = {n_train}; pass a smaller --k")
    results = knn_accuracies(train.features, train.labels, test.features, test.labels,
                             ks=ks, temperature=args.temperature, device=backbone.device)  # fmt: skip
    rows = [{"k": k, "temperature": args.temperature, "top1": r.top1, "top5": r.top5} for k, r in results.items()]
    protocol = {"variant": "paper", "k": ks, "k_skipped": skipped, "temperature": args.temperature}
    return Report("k-NN", rows, {**settings, **sizes(train, test), **protocol})
