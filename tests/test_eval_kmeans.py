"""k-means protocol: metrics near 1 on separated blobs, near 0 on random labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from carp_fast.eval.kmeans import kmeans_evaluate


def _blobs(n_per_class, num_classes, dim, spread, seed):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(num_classes, dim, generator=g) * 10
    labels = torch.arange(num_classes).repeat_interleave(n_per_class)
    return centres[labels] + spread * torch.randn(len(labels), dim, generator=g), labels


@pytest.mark.parametrize("preprocess", ["l2", "standardize", "none"])
def test_separated_blobs_score_near_one(preprocess):
    train, labels = _blobs(100, 6, 16, spread=0.5, seed=0)
    test = train + 0.1 * torch.randn(train.shape, generator=torch.Generator().manual_seed(1))
    # nredo=20 (the paper's): with 3 redos, two seeds in one blob is a common local minimum.
    result = kmeans_evaluate(train, labels, test, labels, preprocess=preprocess)
    assert result.nmi > 0.98 and result.ami > 0.98 and result.ari > 0.98


def test_random_labels_score_near_zero():
    features = torch.randn(600, 16, generator=torch.Generator().manual_seed(2))
    labels = torch.randint(0, 6, (600,), generator=torch.Generator().manual_seed(3))
    result = kmeans_evaluate(features, labels, nredo=2)
    assert abs(result.ami) < 0.05 and abs(result.ari) < 0.05 and result.nmi < 0.05


def test_labels_permutation_does_not_matter():
    train, labels = _blobs(50, 4, 8, spread=0.5, seed=4)
    permuted = torch.tensor([2, 0, 3, 1])[labels]
    assert kmeans_evaluate(train, labels, nredo=2) == kmeans_evaluate(train, permuted, nredo=2)


def test_errors():
    features = torch.randn(20, 4)
    with pytest.raises(ValueError, match="at least 2 clusters"):
        kmeans_evaluate(features, torch.zeros(20, dtype=torch.long))
    with pytest.raises(ValueError, match="train_labels must be"):
        kmeans_evaluate(features, torch.zeros(19, dtype=torch.long))
    with pytest.raises(ValueError, match="test_labels must be"):
        kmeans_evaluate(features, torch.arange(20) % 2, features, torch.zeros(3, dtype=torch.long))
    with pytest.raises(ValueError, match="exceeds the 20 training features"):
        kmeans_evaluate(features, torch.arange(20) % 2, num_clusters=21)
    with pytest.raises(ValueError, match="preprocess must be"):
        kmeans_evaluate(features, torch.arange(20) % 2, preprocess="pca")


def _reference_scores(train, labels, test, test_labels, k, nredo, seed):
    """Standardise with the training split's mean / population std (numpy), then faiss
    spherical k-means, assignment by inner product, sklearn scores: the official recipe."""
    import faiss
    from sklearn import metrics

    x, t = train.double().numpy(), test.double().numpy()
    mean, std = x.mean(0), x.std(0)
    std[std == 0] = 1.0
    x, t = ((x - mean) / std).astype(np.float32), ((t - mean) / std).astype(np.float32)
    km = faiss.Kmeans(x.shape[1], k, niter=100, nredo=nredo, spherical=True, seed=seed, verbose=False)
    km.train(x)
    assignment = (t @ km.centroids.T).argmax(1)
    truth = test_labels.numpy()
    return (metrics.normalized_mutual_info_score(truth, assignment),
            metrics.adjusted_mutual_info_score(truth, assignment),
            metrics.adjusted_rand_score(truth, assignment))  # fmt: skip


@pytest.mark.parametrize("nredo", [1, 3])
def test_paper_default_matches_standardise_then_cluster(nredo):
    # Dimensions on very different scales with an offset: standardising changes the
    # clustering, so a missing (or test-fitted) standardisation changes the scores.
    g = torch.Generator().manual_seed(5)
    train, labels = _blobs(40, 4, 6, spread=4.0, seed=6)
    scale = torch.tensor([100.0, 0.01, 1.0, 10.0, 0.1, 3.0])
    train = train * scale + 50.0
    test_labels = torch.arange(4).repeat_interleave(15)
    test = _blobs(15, 4, 6, spread=4.0, seed=6)[0] * scale + 50.0 + torch.randn(60, 6, generator=g)
    got = kmeans_evaluate(train, labels, test, test_labels, nredo=nredo)
    want = _reference_scores(train, labels, test, test_labels, 4, nredo, seed=1234)
    assert got == pytest.approx(want, abs=1e-6)
    # L2 normalisation instead of standardisation is a different measurement here.
    assert kmeans_evaluate(train, labels, test, test_labels, nredo=nredo, preprocess="l2") != got


def test_constant_dimension_is_left_unscaled():
    train, labels = _blobs(30, 3, 4, spread=0.5, seed=8)
    train[:, 2] = 7.0  # StandardScaler leaves a zero-variance dimension at scale 1
    result = kmeans_evaluate(train, labels, nredo=3)
    assert result.nmi > 0.95
