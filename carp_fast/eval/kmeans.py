"""k-means clustering of frozen features, scored against the true labels (paper D.4).

The paper's protocol, as run by the official code (sthalles/carp ``helpers/clustering.py``):

1. standardise every feature dimension with the TRAINING split's mean and standard
   deviation (scikit-learn's ``StandardScaler``, fitted on train, applied to both splits);
   no L2 normalisation;
2. fit faiss k-means on the training features: k = the number of true classes, 100
   iterations, spherical centroids, 20 redos (the paper's text; the official script runs
   10: pass ``nredo=10``), faiss's default of at most 256 training points per centroid
   and its default seed 1234 (the official script leaves both);
3. assign every validation feature to its most similar centroid (inner product, as the
   official ``kmeans.index.search``) and report NMI, AMI and ARI (scikit-learn), each in
   [0, 1] (ARI can dip below 0).

For ImageNet the paper fits on the SimCLR 10 % subset of the training set
(``carp-fast eval kmeans --subset-file``). ``preprocess="l2"`` (L2-normalise, the k-NN
convention) and ``"none"`` are kept as options; they are not the paper's.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .features import check_labelled, check_same_dim
from .frozen import FrozenBackbone
from .report import Report, sizes

PREPROCESS = ("standardize", "l2", "none")  # the first is the paper's
NITER = 100  # paper D.4
NREDO = 20  # paper D.4; the official script uses 10
MAX_POINTS_PER_CENTROID = 256  # faiss's default, which the official script keeps
SEED = 1234  # faiss's default seed, which the official script keeps


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
    niter: int = NITER,
    nredo: int = NREDO,
    spherical: bool = True,
    preprocess: str = PREPROCESS[0],
    max_points_per_centroid: int | None = MAX_POINTS_PER_CENTROID,
    seed: int = SEED,
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
        preprocess: one of :data:`PREPROCESS`: ``"standardize"`` (the paper's, see the
            module docstring), ``"l2"`` or ``"none"``.
        max_points_per_centroid: faiss subsamples the training set to this many points
            per centroid (faiss's default 256, kept by the official script); None uses
            every training feature.
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
    """float32 C-contiguous numpy arrays ``[n, D]`` (what faiss needs), preprocessed as ``how``.

    ``"standardize"``: scikit-learn's StandardScaler fitted on ``train`` only (population
    std; a constant dimension is left unscaled), applied to both, as the official code.
    """
    train_np = train.detach().cpu().double().numpy()
    test_np = test.detach().cpu().double().numpy()
    if how == "standardize":
        from sklearn.preprocessing import StandardScaler

        scaler = StandardScaler().fit(train_np)  # training statistics only
        train_np, test_np = scaler.transform(train_np), scaler.transform(test_np)
    elif how == "l2":
        train_np = train_np / np.maximum(np.linalg.norm(train_np, axis=1, keepdims=True), 1e-12)
        test_np = test_np / np.maximum(np.linalg.norm(test_np, axis=1, keepdims=True), 1e-12)
    return (
        np.ascontiguousarray(train_np, dtype=np.float32),
        np.ascontiguousarray(test_np, dtype=np.float32),
    )


# --- carp-fast eval kmeans ------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--niter", type=int, default=NITER)
    parser.add_argument("--nredo", type=int, default=NREDO, help="paper D.4 says 20 redos; the official script runs 10")
    parser.add_argument("--preprocess", choices=PREPROCESS, default=PREPROCESS[0], help="standardize (train mean/std, the paper's) | l2 | none")
    parser.add_argument("--max-points-per-centroid", type=int, default=MAX_POINTS_PER_CENTROID, help="faiss subsamples the fit to this many points per centroid (faiss default, kept by the official script); 0: all")
    parser.add_argument("--subset-file", type=Path, default=None, help="fit on the training images named in this list (SimCLR's 10%% ImageNet subset: one nXXXXXXXX_YYYY.JPEG per line)")
    parser.add_argument("--seed", type=int, default=SEED, help="faiss seed (its default, which the official script keeps)")


def run_from_args(args: argparse.Namespace, backbone: FrozenBackbone) -> Report:
    """NMI / AMI / ARI of k-means fitted on the training features (or the ``--subset-file`` ones)."""
    settings, (train, test) = backbone.labelled_features(args, subset_file=args.subset_file)
    paper = args.preprocess == PREPROCESS[0] and args.nredo in (10, 20) and args.niter == NITER
    max_points = args.max_points_per_centroid or None  # 0: every training feature
    protocol = {"variant": "paper" if paper else "custom", "niter": args.niter, "nredo": args.nredo,
                "preprocess": args.preprocess, "spherical": True, "num_clusters": "number of classes",
                "max_points_per_centroid": max_points, "seed": args.seed,
                "subset_file": None if args.subset_file is None else str(args.subset_file.resolve())}  # fmt: skip
    result = kmeans_evaluate(train.features, train.labels, test.features, test.labels, niter=args.niter,
                             nredo=args.nredo, preprocess=args.preprocess, max_points_per_centroid=max_points,
                             seed=args.seed)  # fmt: skip
    return Report("k-means", [result._asdict()], {**settings, **sizes(train, test), **protocol})
