"""Few-shot classification on frozen features (paper section 5, appendix D.2).

For n in {1, 2, 4, 8, 16} labelled images per class and 5 seeds, draw exactly n training
features of every class, train a linear classifier on them (:func:`linear_probe`) and
score it on the whole test split; report the mean and standard deviation over seeds
(the paper averages 5 independent runs).
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import torch

from .features import check_labelled, check_same_dim
from .linear import linear_probe

SHOTS = (1, 2, 4, 8, 16)
SEEDS = 5


class FewShotResult(NamedTuple):
    """Top-1 accuracy (percent) for one n: mean and std over seeds, and every run."""

    n: int
    mean: float
    std: float
    runs: list[float]


def sample_few_shot(labels: torch.Tensor, n: int, *, seed: int = 0) -> torch.Tensor:
    """Indices of exactly ``n`` items of every class present in ``labels``.

    Args:
        labels: ``[N]`` integer labels.
        n: items per class, at least 1.
        seed: the draw; the same seed gives the same indices.

    Returns:
        ``[n * C]`` int64 indices into ``labels``, grouped by class (ascending).

    Raises:
        ValueError: ``n < 1``, or a class with fewer than ``n`` items.
    """
    if labels.ndim != 1:
        raise ValueError(f"labels must be [N], got shape {list(labels.shape)}")
    if n < 1:
        raise ValueError(f"n (items per class) must be at least 1, got {n}")
    generator = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    picked = []
    for cls in torch.unique(labels):
        members = (labels == cls).nonzero().flatten()
        if len(members) < n:
            raise ValueError(
                f"class {int(cls)} has {len(members)} items, fewer than n = {n} per class"
            )
        picked.append(members[torch.randperm(len(members), generator=generator)[:n]])
    return torch.cat(picked)


def few_shot_evaluate(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    shots: Sequence[int] = SHOTS,
    seeds: int = SEEDS,
    epochs: int = 100,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    device: torch.device | str | None = None,
) -> dict[int, FewShotResult]:
    """Few-shot top-1 accuracy for every n in ``shots``, over ``seeds`` draws.

    Args:
        train_features: ``[n_train, D]``, the pool the labelled shots are drawn from.
        train_labels: ``[n_train]``.
        test_features, test_labels: ``[n_test, D]``, ``[n_test]``.
        shots: items per class.
        seeds: independent draws per n (seed s draws with ``sample_few_shot(seed=s)`` and
            initialises the classifier with seed s).
        epochs, lr, weight_decay: of the :func:`linear_probe`, trained full batch
            (every shot in one batch, at most 1024).

    Returns:
        ``{n: FewShotResult(n, mean, std, runs)}``; std is the population std (0 for one
        seed).
    """
    # Checked once up front: the probes below only see the sampled subsets.
    check_labelled(train_features, train_labels, "train")
    check_labelled(test_features, test_labels, "test")
    check_same_dim(train_features, test_features)
    if seeds < 1:
        raise ValueError(f"seeds must be at least 1, got {seeds}")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    results = {}
    for n in shots:
        runs = []
        for seed in range(seeds):
            index = sample_few_shot(train_labels, n, seed=seed)
            probe = linear_probe(
                train_features[index],
                train_labels[index],
                test_features,
                test_labels,
                num_classes=num_classes,
                epochs=epochs,
                batch_size=min(len(index), 1024),
                lr=lr,
                weight_decay=weight_decay,
                seed=seed,
                device=device,
            )
            runs.append(probe.top1)
        accuracy = torch.tensor(runs, dtype=torch.float64)
        results[n] = FewShotResult(
            n, float(accuracy.mean()), float(accuracy.std(unbiased=False)), runs
        )
    return results
