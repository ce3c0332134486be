"""Weighted k-NN (DINO eval_knn.py protocol) against a loop-and-full-matrix reference."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from carp_fast.eval.knn import KNNResult, knn_accuracies, knn_accuracy, knn_classify


def reference_knn_scores(train, train_labels, test, k, temperature, num_classes):
    """The vote written out: full float64 cosine matrix, python loops over test rows."""
    train = train.double() / train.double().norm(dim=1, keepdim=True)
    test = test.double() / test.double().norm(dim=1, keepdim=True)
    sims = test @ train.T  # [n_test, n_train], the whole matrix at once
    scores = torch.zeros(len(test), num_classes, dtype=torch.float64)
    for i in range(len(test)):
        order = sorted(range(len(train)), key=lambda j: -float(sims[i, j]))[:k]
        for j in order:
            scores[i, int(train_labels[j])] += math.exp(float(sims[i, j]) / temperature)
    return scores


def reference_accuracy(scores, test_labels):
    """Top-1 / top-5 (percent) from reference scores; top-5 only counts voted-for labels."""
    ranked = scores.argsort(dim=1, descending=True)
    top1 = 100.0 * (ranked[:, 0] == test_labels).double().mean().item()
    voted = scores[torch.arange(len(scores)), test_labels] > 0
    in_top5 = (ranked[:, :5] == test_labels[:, None]).any(1)
    return top1, 100.0 * (in_top5 & voted).double().mean().item()


@pytest.fixture
def bank():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(300, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 7, (300,), generator=g)
    test = torch.randn(23, 8, generator=g, dtype=torch.float64)
    test_labels = torch.randint(0, 7, (23,), generator=g)
    return train, labels, test, test_labels


@pytest.mark.parametrize("k", [1, 2, 10, 20, 100, 200, 300])
@pytest.mark.parametrize("chunk_size", [None, 1, 5])
def test_knn_classify_matches_reference(bank, k, chunk_size):
    train, labels, test, _ = bank
    got = knn_classify(train, labels, test, k=k, temperature=0.07, chunk_size=chunk_size)
    want = reference_knn_scores(train, labels, test, k, 0.07, 7)
    assert got.shape == (23, 7)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_knn_classify_float32_and_num_classes(bank):
    train, labels, test, _ = bank
    got = knn_classify(train.float(), labels, test.float(), k=20, temperature=0.1, num_classes=10)
    want = reference_knn_scores(train, labels, test, 20, 0.1, 10)
    assert got.dtype == torch.float32 and got.shape == (23, 10)
    assert got[:, 7:].abs().max() == 0  # classes absent from the bank get no votes
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4)


def test_scale_invariance(bank):
    # Cosine similarity: rescaling a feature must not change the vote.
    train, labels, test, _ = bank
    scale = torch.rand(len(train), 1, dtype=torch.float64) * 10 + 0.1
    torch.testing.assert_close(
        knn_classify(train * scale, labels, test, k=10), knn_classify(train, labels, test, k=10)
    )


def test_knn_accuracy_matches_reference(bank):
    train, labels, test, test_labels = bank
    for k in (1, 10, 20):
        scores = reference_knn_scores(train, labels, test, k, 0.07, 7)
        top1, top5 = reference_accuracy(scores, test_labels)
        got = knn_accuracy(train, labels, test, test_labels, k=k, chunk_size=4)
        assert isinstance(got, KNNResult)
        assert got.top1 == pytest.approx(top1) and got.top5 == pytest.approx(top5)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_knn_accuracies_sweep_matches_reference(bank, chunk_size):
    # One pass for every k (the first k of the max(ks) neighbours) against the reference
    # run separately for each k.
    train, labels, test, test_labels = bank
    ks = (10, 20, 100, 200)
    sweep = knn_accuracies(train, labels, test, test_labels, ks=ks, chunk_size=chunk_size)
    assert list(sweep) == list(ks)
    for k in ks:
        scores = reference_knn_scores(train, labels, test, k, 0.07, 7)
        top1, top5 = reference_accuracy(scores, test_labels)
        assert sweep[k].top1 == pytest.approx(top1) and sweep[k].top5 == pytest.approx(top5)


def test_separable_clusters_are_classified_perfectly():
    g = torch.Generator().manual_seed(1)
    centres = torch.eye(4) * 10
    labels = torch.arange(4).repeat_interleave(50)
    train = centres[labels] + torch.randn(200, 4, generator=g)
    test = centres[labels[::5]] + torch.randn(40, 4, generator=g)
    assert knn_accuracy(train, labels, test, labels[::5], k=20).top1 == 100.0


def test_errors(bank):
    train, labels, test, test_labels = bank
    with pytest.raises(ValueError, match="k must be between 1 and the bank size"):
        knn_classify(train, labels, test, k=301)
    with pytest.raises(ValueError, match="k must be between"):
        knn_classify(train, labels, test, k=0)
    with pytest.raises(ValueError, match="train_labels must be"):
        knn_classify(train, labels[:-1], test)
    with pytest.raises(ValueError, match="test_labels must be"):
        knn_accuracy(train, labels, test, test_labels[:-1])
    with pytest.raises(ValueError, match="share D"):
        knn_classify(train, labels, test[:, :4])
    with pytest.raises(ValueError, match="num_classes"):
        knn_classify(train, labels, test, num_classes=3)
    with pytest.raises(ValueError, match="temperature"):
        knn_classify(train, labels, test, temperature=0.0)
    with pytest.raises(ValueError, match="integers"):
        knn_classify(train, labels.double(), test)


def test_empty_test_features_are_rejected(bank):
    # Used to crash: ZeroDivisionError in knn_accuracies, torch.cat([]) in knn_classify.
    train, labels, test, test_labels = bank
    with pytest.raises(ValueError, match="test_features is empty"):
        knn_accuracies(train, labels, test[:0], test_labels[:0])
    with pytest.raises(ValueError, match="test_features is empty"):
        knn_accuracy(train, labels, test[:0], test_labels[:0])
    with pytest.raises(ValueError, match="test_features is empty"):
        knn_classify(train, labels, test[:0])
    with pytest.raises(ValueError, match="train_features is empty"):
        knn_classify(train[:0], labels[:0], test)


@pytest.mark.parametrize("training", [True, False])
def test_knn_monitor_restores_backbone_mode(training):
    from carp_fast.callbacks import KNNMonitor

    g = torch.Generator().manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.randn(10, 3, 2, 2, generator=g), torch.arange(10) % 3), batch_size=4
    )
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), nn.BatchNorm1d(4)).train(training)
    monitor = KNNMonitor(loader, loader, k=3)
    teacher = SimpleNamespace(backbone=backbone)
    monitor.learn = SimpleNamespace(model=SimpleNamespace(teacher=teacher))  # a stub Learner
    top1, top5 = monitor.evaluate()
    assert 0 <= top1 <= top5 <= 100
    assert backbone.training == training
