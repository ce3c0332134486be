"""Linear probe on frozen, cached features (paper section 5, appendix D.1).

A single ``nn.Linear(D, C)`` trained with cross-entropy, SGD with momentum and a cosine
learning-rate schedule, on features extracted once (no augmentation). The paper's
ImageNet number trains for 100 epochs on augmented crops with a hyper-parameter grid
(iBOT protocol); on cached features this probe is the cheap, deterministic variant,
and its settings are returned beside the scores so they are never confused.

Features are standardised per dimension with the training split's mean and std (a
non-affine BatchNorm, as in MoCo/SimCLR-style probes), which makes one learning rate work
across backbones whose feature scales differ by orders of magnitude.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .features import Features, check_labelled, check_same_dim
from .frozen import FrozenBackbone
from .report import Report, sizes

LR = 0.1  # peak learning rate
WEIGHT_DECAY = 0.0


class LinearProbeResult(NamedTuple):
    """Top-1 / top-5 accuracy (percent) on the test split, and the settings used."""

    top1: float
    top5: float
    settings: dict[str, Any]


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int | None = None,
    epochs: int = 100,
    batch_size: int = 256,
    lr: float = LR,
    momentum: float = 0.9,
    weight_decay: float = WEIGHT_DECAY,
    standardize: bool = True,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> LinearProbeResult:
    """Train a linear classifier on ``train_features`` and score it on ``test_features``.

    Args:
        train_features: ``[n_train, D]``.
        train_labels: ``[n_train]`` integers in ``[0, C)``.
        test_features, test_labels: ``[n_test, D]``, ``[n_test]``.
        num_classes: C; defaults to ``max(train_labels, test_labels) + 1``.
        epochs: passes over the training features.
        batch_size: features per SGD step (the last, smaller batch of an epoch is kept).
        lr: peak learning rate, cosine-decayed to 0 over all steps (per step, no warm-up).
        momentum, weight_decay: SGD settings (no weight decay on the bias).
        standardize: centre and scale every dimension with training statistics.
        seed: initialisation and shuffling.
        device: defaults to CUDA when available, else the CPU.

    Returns:
        :class:`LinearProbeResult` (top-1, top-5 in percent, and the settings).
    """
    check_labelled(train_features, train_labels, "train")
    check_labelled(test_features, test_labels, "test")
    check_same_dim(train_features, test_features)
    if epochs < 1 or batch_size < 1 or not lr > 0:
        raise ValueError(
            f"epochs, batch_size and lr must be positive, got {epochs}, {batch_size}, {lr}"
        )
    if num_classes is None:
        num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    settings = dict(
        num_classes=num_classes, epochs=epochs, batch_size=batch_size, lr=lr,
        momentum=momentum, weight_decay=weight_decay, standardize=standardize, seed=seed,
    )  # fmt: skip

    generator = torch.Generator().manual_seed(seed)
    x_train = train_features.float().to(device)
    x_test = test_features.float().to(device)
    y_train = train_labels.long().to(device)
    if standardize:
        mean, std = x_train.mean(0), x_train.std(0, unbiased=False).clamp_min(1e-6)
        x_train, x_test = (x_train - mean) / std, (x_test - mean) / std

    classifier = nn.Linear(x_train.shape[1], num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        nn.init.normal_(classifier.weight, std=0.01)  # DINO's LinearClassifier init
    nn.init.zeros_(classifier.bias)
    classifier = classifier.to(device)
    optimizer = torch.optim.SGD(
        [
            {"params": [classifier.weight], "weight_decay": weight_decay},
            {"params": [classifier.bias], "weight_decay": 0.0},
        ],
        lr=lr,
        momentum=momentum,
    )
    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    total_steps = epochs * steps_per_epoch
    step = 0
    for _ in range(epochs):
        order = torch.randperm(len(x_train), generator=generator).to(device)
        for start in range(0, len(x_train), batch_size):
            batch = order[start : start + batch_size]
            for group in optimizer.param_groups:  # cosine schedule, a pure function of step
                group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            loss = F.cross_entropy(classifier(x_train[batch]), y_train[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1

    with torch.no_grad():
        logits = classifier(x_test)  # [n_test, C]
        top = logits.topk(min(5, num_classes), dim=1).indices.cpu()
        correct = top.eq(test_labels.long().view(-1, 1))
        top1 = 100.0 * correct[:, 0].float().mean().item()
        top5 = 100.0 * correct.any(dim=1).float().mean().item()
    return LinearProbeResult(top1, top5, settings)


# The probe a pretraining run trains beside its k-NN (carp_fast.run: KNNMonitor with
# --linear-probe, and the raw-pixel baseline), the same for every network and for the pixels:
# shorter than linear_probe's defaults, a few seconds for 20k bank features on a CPU.
RUN_PROBE = dict(epochs=30, batch_size=1024, lr=0.1)


def bank_probe(bank: Features, queries: Features, *, device: torch.device | str | None = None) -> LinearProbeResult:
    """:func:`linear_probe` (settings :data:`RUN_PROBE`) trained on the k-NN bank's cached
    features and scored on the queries': the second protocol beside the k-NN, on the same split.

    Args:
        bank, queries: :class:`~carp_fast.eval.features.Features` ``[N, D]`` with labels ``[N]``.
        device: as :func:`linear_probe`.
    """
    return linear_probe(bank.features, bank.labels, queries.features, queries.labels, device=device, **RUN_PROBE)


# --- carp-fast eval linear --protocol fast (options: .linear_grid.add_arguments) --------


def run_from_args(args: argparse.Namespace, backbone: FrozenBackbone) -> Report:
    """Top-1 / top-5 of one probe on cached centre-crop features (not the paper's protocol)."""
    settings, (train, test) = backbone.labelled_features(args)
    result = linear_probe(
        train.features, train.labels, test.features, test.labels,
        epochs=args.epochs, lr=args.lr, batch_size=args.probe_batch_size,
        weight_decay=args.weight_decay, seed=args.seed, device=backbone.device,
    )  # fmt: skip
    row = {"top1": result.top1, "top5": result.top5}
    protocol = {"variant": "fast", "not_the_paper": "one SGD probe on cached, unaugmented, standardised features",
                **result.settings}  # fmt: skip
    return Report("linear probe (fast, not the paper's)", [row], {**settings, **sizes(train, test), **protocol})
