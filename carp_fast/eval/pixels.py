"""The raw-pixel baseline: k-NN on the images themselves, the floor learned features must beat."""

from __future__ import annotations

from typing import Iterable

import torch

from .features import Features, extract_features
from .knn import TEMPERATURE, KNNResult, loader_knn


def raw_pixel_features(loader: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Features:
    """Each image's pixels as its feature: ``[N, 3, S, S]`` as the loader gives them to the
    network (resized, cropped, normalised), flattened to ``[N, 3*S*S]``, on the CPU. Extract
    them once to score both protocols (:func:`~carp_fast.eval.knn.knn_accuracy` and
    :func:`~carp_fast.eval.linear.bank_probe`) on the same features."""
    return extract_features(torch.nn.Flatten(), loader, device="cpu", progress=False)


def raw_pixel_knn(
    bank: Iterable[tuple[torch.Tensor, torch.Tensor]],
    queries: Iterable[tuple[torch.Tensor, torch.Tensor]],
    *,
    k: int = 20,
    temperature: float = TEMPERATURE,
) -> KNNResult:
    """Weighted k-NN top-1 / top-5 (percent) with each image's pixels as its feature.

    The images are taken as the loaders give them to the network (resized, cropped and
    normalised: ``[N, 3, S, S]``), flattened to ``[N, 3*S*S]``, L2-normalised and voted on
    exactly as :func:`~carp_fast.eval.knn.knn_accuracy` votes on learned features (same k
    and T), so the two numbers compare one representation against the other.

    Args:
        bank, queries: labelled loaders of ``(images, labels)`` (the k-NN monitor's).
        k, temperature: the vote's k and T (k at most the bank's size, as the k-NN monitor).
    """
    return loader_knn(torch.nn.Flatten(), bank, queries, k=k, temperature=temperature, device="cpu")
