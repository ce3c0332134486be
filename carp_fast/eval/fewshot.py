"""Few-shot classification on frozen features, iNat2018 style (paper section 5, D.2).

For n in {1, 2, 4, 8, 16} labelled images per class and 5 runs, draw exactly n training
features of every class, train a linear classifier on them and score its top-1 on the
whole test split; report the mean and standard deviation over runs. Any class-folder
data set works the same way (multi-label VOC07 is :mod:`.voc`).

``protocol="paper"`` (paper D.2, official ``evaluate_inat2018.py``): ``nn.Linear``
initialised N(0, 0.01^2) with zero bias, 20 epochs, batch 256, SGD momentum 0.9, weight
decay 1e-6 (the official default), lr 0.03 divided by 10 at epochs 12 and 18, raw
(unstandardised) features. The official script feeds a random resized crop + flip of
every training image each epoch; here the classifier trains on cached centre-crop
features (the backbone is frozen either way), which is the one difference. The official
launch script passes lr 0.3 where the paper's text says 0.03: ``lr=0.3`` for that.

``protocol="fast"``: the cached :func:`.linear.linear_probe` (standardised features,
cosine schedule); not the paper's.
"""

from __future__ import annotations

import argparse
from typing import Callable, NamedTuple, Sequence

import torch

from .features import check_labelled, check_same_dim, progress_bar
from .frozen import FrozenBackbone
from .linear import linear_probe
from .linear_grid import Setting, linear_grid
from .report import Report, add_variant_argument, sizes

SHOTS = (1, 2, 4, 8, 16)
SEEDS = 5
PROTOCOLS = ("paper", "fast")
PAPER = dict(epochs=20, lr=0.03, milestones=(12, 18), weight_decay=1e-6, batch_size=256, momentum=0.9)
FAST = dict(epochs=100, lr=0.1, weight_decay=5e-4)  # the cached probe's defaults (not the paper's)


class TrainingSettings(NamedTuple):
    """How each few-shot classifier trains."""

    epochs: int
    lr: float
    weight_decay: float


class FewShotResult(NamedTuple):
    """A score in percent (top-1 accuracy; VOC07 mAP) for one n: mean and population std
    over the runs, and every run."""

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
    protocol: str = "paper",
    epochs: int | None = None,
    lr: float | None = None,
    weight_decay: float | None = None,
    milestones: Sequence[int] = PAPER["milestones"],
    batch_size: int = PAPER["batch_size"],
    device: torch.device | str | None = None,
    progress: bool = False,
) -> dict[int, FewShotResult]:
    """Few-shot top-1 accuracy for every n in ``shots``, over ``seeds`` draws.

    Args:
        train_features: ``[n_train, D]``, the pool the labelled shots are drawn from.
        train_labels: ``[n_train]``.
        test_features, test_labels: ``[n_test, D]``, ``[n_test]``.
        shots: items per class.
        seeds: independent draws per n (seed s draws with ``sample_few_shot(seed=s)`` and
            initialises the classifier with seed s).
        protocol: ``"paper"`` or ``"fast"`` (module docstring).
        epochs, lr, weight_decay: None: the protocol's (paper: 20, 0.03, 1e-6; fast: 100,
            0.1, 5e-4).
        milestones, batch_size: of the paper protocol (lr / 10 at each milestone epoch).

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
    epochs, lr, weight_decay = training_settings(protocol, epochs, lr, weight_decay)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1

    def top1(n: int, seed: int) -> float:
        index = sample_few_shot(train_labels, n, seed=seed)
        if protocol == "paper":
            return _paper_run(train_features[index], train_labels[index], test_features, test_labels,
                              num_classes, epochs, lr, weight_decay, milestones, batch_size, seed, device)  # fmt: skip
        return linear_probe(
            train_features[index], train_labels[index], test_features, test_labels,
            num_classes=num_classes, epochs=epochs, batch_size=min(len(index), 1024),
            lr=lr, weight_decay=weight_decay, seed=seed, device=device,
        ).top1  # fmt: skip

    return repeat_draws(top1, shots, seeds, description="few-shot runs", progress=progress)


def training_settings(protocol: str, epochs: int | None = None, lr: float | None = None,
                      weight_decay: float | None = None) -> TrainingSettings:  # fmt: skip
    """The classifier's epochs, lr and weight decay: those given, the protocol's for those None."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    defaults = PAPER if protocol == "paper" else FAST
    return TrainingSettings(
        defaults["epochs"] if epochs is None else epochs,
        defaults["lr"] if lr is None else lr,
        defaults["weight_decay"] if weight_decay is None else weight_decay,
    )


def repeat_draws(score: Callable[[int, int], float], shots: Sequence[int], draws: int, *,
                 description: str, progress: bool = False) -> dict[int, FewShotResult]:  # fmt: skip
    """``score(n, draw)`` for every n in ``shots`` and draw in ``range(draws)``, summarised per
    n as :class:`FewShotResult` (a progress bar over every run when ``progress``)."""
    results = {}
    with progress_bar(progress, description, len(shots) * draws) as advance:
        for n in shots:
            runs = []
            for draw in range(draws):
                runs.append(score(n, draw))
                advance()
            scores = torch.tensor(runs, dtype=torch.float64)
            results[n] = FewShotResult(n, float(scores.mean()), float(scores.std(unbiased=False)), runs)
    return results


def _paper_run(x, y, test_x, test_y, num_classes, epochs, lr, weight_decay, milestones, batch_size, seed, device) -> float:
    """Top-1 (percent) of one paper-protocol classifier: a one-head :func:`linear_grid`
    with the multistep schedule, shuffled batches of the cached shot features."""

    def epoch_batches(epoch: int):
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1000 + epoch))
        return [(x[order[i : i + batch_size]], y[order[i : i + batch_size]]) for i in range(0, len(x), batch_size)]

    result = linear_grid(epoch_batches, test_x, test_y, num_classes=num_classes,
                         grid=[Setting(lr, weight_decay, "sgd")], epochs=epochs, schedule="multistep",
                         milestones=milestones, seed=seed, device=device)  # fmt: skip
    return result.best["top1"]


# --- carp-fast eval fewshot -----------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_variant_argument(parser, "paper: 20 epochs, SGD, lr 0.03 / 10 at 12 and 18; fast: cached cosine probe (not the paper's)")
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    parser.add_argument("--seeds", type=int, default=SEEDS, help="independent runs per n")
    parser.add_argument("--epochs", type=int, default=None, help="default: 20 (paper) or 100 (fast)")
    parser.add_argument("--lr", type=float, default=None, help="default: 0.03 (paper text; the official launch script passes 0.3) or 0.1 (fast)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: 1e-6 (paper) or 5e-4 (fast)")


def run_from_args(args: argparse.Namespace, backbone: FrozenBackbone) -> Report:
    """Top-1 mean and std over ``--seeds`` draws for every n of ``--shots``."""
    settings, (train, test) = backbone.labelled_features(args)
    results = few_shot_evaluate(
        train.features, train.labels, test.features, test.labels,
        shots=args.shots, seeds=args.seeds, protocol=args.variant, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, device=backbone.device, progress=backbone.progress,
    )  # fmt: skip
    rows = [{"n": r.n, "top1_mean": r.mean, "top1_std": r.std, "runs": r.runs} for r in results.values()]
    training = training_settings(args.variant, args.epochs, args.lr, args.weight_decay)._asdict()
    if args.variant == "paper":
        training.update(milestones=list(PAPER["milestones"]), batch_size=PAPER["batch_size"], momentum=PAPER["momentum"],
                       train_views="cached centre-crop features (the official script augments)")  # fmt: skip
    else:
        training = {"classifier": "linear_probe", "not_the_paper": "cached cosine probe", **training}
    protocol = {"variant": args.variant, "shots": args.shots, "seeds": args.seeds, **training}
    return Report("few-shot", rows, {**settings, **sizes(train, test), **protocol})
