"""k-means clustering of frozen features, scored against the true labels (paper D.4).

Protocol (CARP paper appendix D.4, table 2): fit faiss k-means with k = the number of
true classes on the training split's features — 100 iterations, 20 redos (the paper's
text; the issue said 10, pass ``nredo=10`` for that), spherical centroids — then assign
every validation feature to its nearest centroid and report NMI, AMI and ARI (percent
scale is not used: all three are in [0, 1], ARI can dip below 0) on the validation split.

Preprocessing: the paper names none beyond "spherical normalization". Spherical k-means
assigns by inner product with unit centroids, so by default features are L2-normalised
(as for k-NN). ``preprocess="standardize"`` first centres and scales every dimension with
the training split's statistics, then L2-normalises; ``"none"`` passes features as they
are.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from .features import check_labelled, check_same_dim

PREPROCESS = ("l2", "standardize", "none")


class KMeansResult(NamedTuple):
    """Clustering scores on the evaluated split, each in [0, 1] (ARI may be < 0)."""

    nmi: float
    ami: float
    ari: float


def kmeans_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor | None = None,
    test_labels: torch.Tensor | None = None,
    *,
    num_clusters: int | None = None,
    niter: int = 100,
    nredo: int = 20,
    spherical: bool = True,
    preprocess: str = "l2",
    max_points_per_centroid: int | None = None,
    seed: int = 0,
    gpu: bool | None = None,
) -> KMeansResult:
    """Fit k-means on the training features, score the test assignment.

    Args:
        train_features: ``[n_train, D]``, the features k-means is fitted on.
        train_labels: ``[n_train]``; only their number of distinct values is used (k).
        test_features, test_labels: ``[n_test, D]`` and ``[n_test]``, assigned to the
            nearest centroid and scored; None scores the training split itself.
        num_clusters: k; defaults to the number of distinct training labels.
        niter, nredo, spherical: faiss ``Kmeans`` settings (paper: 100, 20, True).
        preprocess: one of :data:`PREPROCESS`, see the module docstring.
        max_points_per_centroid: faiss subsamples the training set to this many points
            per centroid (its default is 256); None uses every training feature.
        seed: faiss's random seed (initial centroids of every redo).
        gpu: train on the GPU; defaults to whether faiss sees one.

    Returns:
        :class:`KMeansResult` (NMI, AMI, ARI from scikit-learn).

    Raises:
        ValueError: malformed or empty features / labels, a D mismatch, fewer than 2
            clusters, k above the sample count.
    """
    import faiss  # lazy: faiss loads the CUDA runtime
    from sklearn import metrics

    if preprocess not in PREPROCESS:
        raise ValueError(f"preprocess must be one of {PREPROCESS}, got {preprocess!r}")
    check_labelled(train_features, train_labels, "train")
    if (test_features is None) != (test_labels is None):
        raise ValueError("pass both test_features and test_labels, or neither")
    if test_features is None:
        test_features, test_labels = train_features, train_labels
    check_labelled(test_features, test_labels, "test")
    check_same_dim(train_features, test_features)
    if num_clusters is None:
        num_clusters = int(torch.unique(train_labels).numel())
    if num_clusters < 2:
        raise ValueError(
            f"k-means needs at least 2 clusters; train_labels holds {num_clusters} class(es) "
            "(pass num_clusters or a data set with several classes)"
        )
    if num_clusters > len(train_features):
        raise ValueError(
            f"num_clusters = {num_clusters} exceeds the {len(train_features)} training features"
        )

    train, test = _preprocess(train_features, test_features, preprocess)
    kmeans = faiss.Kmeans(
        train.shape[1],
        num_clusters,
        niter=niter,
        nredo=nredo,
        spherical=spherical,
        seed=seed,
        gpu=faiss.get_num_gpus() > 0 if gpu is None else gpu,
        max_points_per_centroid=max_points_per_centroid or len(train),
        verbose=False,
    )
    kmeans.train(train)
    # Nearest centroid [n_test] by kmeans.index: inner product for spherical (unit
    # centroids), L2 otherwise, on the GPU when gpu is set.
    _, assignment = kmeans.assign(test)
    truth = test_labels.cpu().numpy()
    return KMeansResult(
        nmi=float(metrics.normalized_mutual_info_score(truth, assignment)),
        ami=float(metrics.adjusted_mutual_info_score(truth, assignment)),
        ari=float(metrics.adjusted_rand_score(truth, assignment)),
    )


def _preprocess(train: torch.Tensor, test: torch.Tensor, how: str) -> tuple[np.ndarray, np.ndarray]:
    """float32 C-contiguous numpy arrays (what faiss needs), preprocessed as ``how``."""
    train, test = train.detach().double().cpu(), test.detach().double().cpu()
    if how == "standardize":
        mean, std = train.mean(0), train.std(0).clamp_min(1e-8)  # training statistics only
        train, test = (train - mean) / std, (test - mean) / std
    if how in ("l2", "standardize"):
        train = torch.nn.functional.normalize(train, dim=1)
        test = torch.nn.functional.normalize(test, dim=1)
    return (
        np.ascontiguousarray(train.float().numpy()),
        np.ascontiguousarray(test.float().numpy()),
    )
