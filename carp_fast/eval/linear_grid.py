"""The paper's linear evaluation: a grid of linear heads trained in one pass (paper D.1).

Paper D.1 follows iBOT's ``eval_linear_multi.py``: the frozen backbone (the teacher) sees,
every epoch, a random resized crop 224 + horizontal flip of each training image
(:func:`carp_fast.eval.data.augmented_epochs`); every batch's features feed EVERY head of
a grid over learning rate x weight decay x optimiser, so the grid costs one backbone
pass per epoch instead of one per setting; after 100 epochs each head is scored on the
test split (resize 256 + centre crop 224) and the best head is reported with the whole
grid.

iBOT's grid (:data:`GRID`): lr in {1, ..., 9} x {1e-4, 1e-3, 1e-2, 1e-1, 1} (45 values),
scaled by batch / 256; weight decay in {0, 1e-6}; SGD or LARS, both momentum 0.9; a
cosine schedule stepped once per epoch (``CosineAnnealingLR(epochs)``, to 0); heads
initialised with weights N(0, 0.01^2) and zero biases. SGD applies the weight decay to
the bias too (iBOT passes every parameter); LARS (``carp_fast.lars``: eta 0.001) skips
1-d tensors. Heads are independent: head h follows exactly the updates a lone
``nn.Linear`` with its setting would (checked by the tests).

Implementation: the H heads are one tensor ``[H, C, D]`` (and biases ``[H, C]``); the
loss is the sum of the heads' mean cross-entropies, so each head gets its own gradient;
the update of every head runs in a few batched tensor ops.
"""

from __future__ import annotations

import argparse
import math
from typing import Any, Callable, Iterable, NamedTuple, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import linear
from .data import augmented_epochs
from .features import check_labelled, progress_bar
from .frozen import FrozenBackbone
from .report import Report, add_variant_argument

EPOCHS = 100  # paper D.1
OPTIMIZERS = ("sgd", "lars")
IBOT_LRS = tuple(round(base * n, 10) for base in (1e-4, 1e-3, 1e-2, 1e-1, 1.0) for n in range(1, 10))
WEIGHT_DECAYS = (0.0, 1e-6)
MOMENTUM = 0.9
ETA = 0.001  # LARS trust coefficient
SCHEDULES = ("cosine", "multistep")


class Setting(NamedTuple):
    """One head's optimiser: base learning rate, weight decay, ``"sgd"`` or ``"lars"``."""

    lr: float
    weight_decay: float
    optimizer: str


GRID = tuple(Setting(lr, wd, opt) for lr in IBOT_LRS for wd in WEIGHT_DECAYS for opt in OPTIMIZERS)


class LinearGridResult(NamedTuple):
    """Per head: its setting and test top-1 / top-5 (percent); the best head; its weights."""

    grid: list[dict[str, Any]]
    best: dict[str, Any]
    weight: torch.Tensor  # [H, C, D]
    bias: torch.Tensor  # [H, C]


def learning_rate(base: float, epoch: int, epochs: int, schedule: str = "cosine",
                  milestones: Sequence[int] = (), gamma: float = 0.1) -> float:
    """The learning rate of ``epoch`` (0-based), a pure function of progress.

    ``"cosine"``: ``base * (1 + cos(pi * epoch / epochs)) / 2`` (``CosineAnnealingLR``);
    ``"multistep"``: ``base * gamma ** (milestones reached)`` (``MultiStepLR``).
    """
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))
    if schedule == "multistep":
        return base * gamma ** sum(epoch >= m for m in milestones)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")


def initial_heads(n_heads: int, dim: int, num_classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights ``[H, C, D]`` ~ N(0, 0.01^2) from ``torch.randn`` seeded with ``seed``, zero biases ``[H, C]``."""
    generator = torch.Generator().manual_seed(seed)
    return 0.01 * torch.randn(n_heads, num_classes, dim, generator=generator), torch.zeros(n_heads, num_classes)


def linear_grid(
    epoch_batches: Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]],
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    num_classes: int,
    backbone: nn.Module | None = None,
    grid: Sequence[Setting] = GRID,
    epochs: int = EPOCHS,
    schedule: str = "cosine",
    milestones: Sequence[int] = (),
    lr_batch_size: int | None = None,
    momentum: float = MOMENTUM,
    eta: float = ETA,
    seed: int = 0,
    device: torch.device | str | None = None,
    amp: bool | None = None,
    progress: bool = False,
) -> LinearGridResult:
    """Train every head of ``grid`` on the same batches; score each on the test features.

    Args:
        epoch_batches: ``epoch -> iterable of (x, labels [N])``: images ``[N, 3, S, S]``
            when ``backbone`` is given (run frozen, in eval mode, under no_grad), else
            features ``[N, D]``.
        test_features: ``[n_test, D]`` features of the test views; test_labels ``[n_test]``.
        num_classes: C.
        backbone: the frozen network, or None when the batches are features already.
        grid: one :class:`Setting` per head.
        epochs: passes over the training data.
        schedule, milestones: see :func:`learning_rate`, applied per epoch.
        lr_batch_size: scale every lr by ``lr_batch_size / 256`` (iBOT's linear scaling
            with the global batch); None: no scaling.
        momentum, eta: SGD / LARS momentum, LARS trust coefficient.
        seed: the heads' initialisation (:func:`initial_heads`).
        amp: bf16 autocast for the backbone (default: on CUDA); heads train in fp32.

    Returns:
        :class:`LinearGridResult`; ``best`` is the head with the highest top-1 (the first
        of equals), as iBOT reports.
    """
    check_labelled(test_features, test_labels, "test")
    bad = [s for s in grid if s.optimizer not in OPTIMIZERS or s.lr <= 0 or s.weight_decay < 0]
    if not grid or bad:
        raise ValueError(f"grid must hold settings with lr > 0, weight_decay >= 0, optimizer in {OPTIMIZERS}; got {bad or 'none'}")
    if epochs < 1:
        raise ValueError(f"epochs must be at least 1, got {epochs}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    amp = device.type == "cuda" if amp is None else amp
    scale = 1.0 if lr_batch_size is None else lr_batch_size / 256
    weight, bias = initial_heads(len(grid), test_features.shape[1], num_classes, seed)
    weight, bias = weight.to(device).requires_grad_(), bias.to(device).requires_grad_()
    base_lr = torch.tensor([s.lr * scale for s in grid], device=device)  # [H]
    decay = torch.tensor([s.weight_decay for s in grid], device=device)  # [H]
    is_lars = torch.tensor([s.optimizer == "lars" for s in grid], device=device)  # [H]
    buffers = [torch.zeros_like(weight), torch.zeros_like(bias)]
    if backbone is not None:
        backbone = backbone.to(device).eval()

    with progress_bar(progress, f"linear grid ({len(grid)} heads)", epochs) as advance:
        for epoch in range(epochs):
            factor = learning_rate(1.0, epoch, epochs, schedule, milestones)
            for x, labels in epoch_batches(epoch):
                x, labels = x.to(device, non_blocking=True), torch.as_tensor(labels).to(device)
                if backbone is not None:
                    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                        x = backbone(x)
                logits = torch.einsum("nd,hcd->hnc", x.float(), weight) + bias[:, None, :]  # [H, N, C]
                # sum over heads of each head's mean cross-entropy: independent gradients
                loss = F.cross_entropy(logits.permute(1, 2, 0), labels[:, None].expand(-1, len(grid)), reduction="sum")
                grad_w, grad_b = torch.autograd.grad(loss / len(labels), (weight, bias))
                _step(weight, bias, grad_w, grad_b, buffers, base_lr * factor, decay, is_lars, momentum, eta)
            advance()

    with torch.no_grad():
        x_test = test_features.float().to(device)
        top = min(5, num_classes)
        target = test_labels.long().to(device).view(1, -1, 1)
        grid_rows = []
        for h, setting in enumerate(grid):  # one head at a time: [n_test, C] logits, not [H, n_test, C]
            predicted = (x_test @ weight[h].T + bias[h]).topk(top, dim=1).indices  # [n_test, top]
            correct = predicted[None].eq(target)[0]
            grid_rows.append({
                "lr": setting.lr, "lr_scaled": setting.lr * scale, "weight_decay": setting.weight_decay,
                "optimizer": setting.optimizer,
                "top1": 100.0 * correct[:, 0].float().mean().item(),
                "top5": 100.0 * correct.any(dim=1).float().mean().item(),
            })  # fmt: skip
    best = max(grid_rows, key=lambda row: row["top1"])  # max keeps the first of equals
    return LinearGridResult(grid_rows, best, weight.detach().cpu(), bias.detach().cpu())


@torch.no_grad()
def _step(weight, bias, grad_w, grad_b, buffers, lr, decay, is_lars, momentum, eta) -> None:
    """One SGD or LARS step of every head (heads along dim 0), in place.

    SGD:  d = grad + wd * p (weight and bias).
    LARS: d = grad + wd * w, times eta * ||w|| / ||d|| when both norms are > 0 (weight
          only); the bias gets d = grad.
    Both: buf = momentum * buf + d; p -= lr * buf.
    """
    h = (-1, 1, 1)  # broadcast a per-head [H] value over [H, C, D]
    d_w = grad_w + decay.view(h) * weight
    w_norm = weight.flatten(1).norm(dim=1)  # [H]
    d_norm = d_w.flatten(1).norm(dim=1)  # [H]
    trust = torch.where((w_norm > 0) & (d_norm > 0), eta * w_norm / d_norm, torch.ones_like(w_norm))
    d_w = d_w * torch.where(is_lars, trust, torch.ones_like(trust)).view(h)
    d_b = grad_b + torch.where(is_lars, torch.zeros_like(decay), decay)[:, None] * bias
    for param, buf, d in ((weight, buffers[0], d_w), (bias, buffers[1], d_b)):
        buf.mul_(momentum).add_(d)
        param.sub_(lr.view((-1,) + (1,) * (param.ndim - 1)) * buf)


# --- carp-fast eval linear --------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The paper's grid, and the cached probe of ``--protocol fast`` (:mod:`.linear`)."""
    add_variant_argument(parser, "paper: iBOT grid on random-resized-crop views, 100 epochs; fast: one SGD probe on cached centre-crop features (not the paper's)")
    parser.add_argument("--epochs", type=int, default=EPOCHS)
    parser.add_argument("--probe-batch-size", type=int, default=256, help="images (paper) or features (fast) per step; the paper's lrs scale by it / 256")
    parser.add_argument("--crop-size", type=int, default=None, help="paper: side of the random resized crop (default: --size)")
    parser.add_argument("--lrs", type=float, nargs="+", default=None, help="paper: base lrs of the grid (default iBOT's 45: 1e-4 ... 9)")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS), help="paper: weight decays of the grid")
    parser.add_argument("--optimizers", choices=OPTIMIZERS, nargs="+", default=list(OPTIMIZERS), help="paper: optimisers of the grid")
    parser.add_argument("--lr", type=float, default=linear.LR, help="fast: peak learning rate (cosine decay)")
    parser.add_argument("--weight-decay", type=float, default=linear.WEIGHT_DECAY, help="fast: weight decay")
    parser.add_argument("--seed", type=int, default=0)


def run_from_args(args: argparse.Namespace, backbone: FrozenBackbone) -> Report:
    """The best head of the grid (``--protocol fast``: :func:`.linear.run_from_args`).

    Test features cached (resize + centre crop); training views augmented every epoch and
    fed through the frozen backbone to every head of the grid."""
    if args.variant == "fast":
        return linear.run_from_args(args, backbone)
    from carp_fast.pipelines import open_split

    settings, (test,) = backbone.labelled_features(args, splits=("test",))
    crop = args.crop_size or settings["size"]
    grid = [Setting(lr, wd, opt) for lr in (args.lrs or IBOT_LRS) for wd in args.weight_decays for opt in args.optimizers]
    source = open_split(args.data, "train")
    if args.train_limit is not None and args.train_limit < len(source):
        source = source.subset(args.train_limit, args.subset_seed)
    epoch_batches = augmented_epochs(source, size=crop, batch_size=args.probe_batch_size,
                                     workers=backbone.workers, seed=args.seed)  # fmt: skip
    num_classes = int(max(int(source.labels.max()), int(test.labels.max()))) + 1
    result = linear_grid(
        epoch_batches, test.features, test.labels, num_classes=num_classes, backbone=backbone.load(), grid=grid,
        epochs=args.epochs, lr_batch_size=args.probe_batch_size, seed=args.seed, device=backbone.device,
        amp=backbone.amp, progress=backbone.progress,
    )  # fmt: skip
    protocol = {"variant": "paper", "epochs": args.epochs, "train_views": f"random resized crop {crop} + flip, every epoch (torchvision)",
                "batch_size": args.probe_batch_size, "lr_scaling": "lr * batch_size / 256", "schedule": "cosine per epoch",
                "momentum": MOMENTUM, "lars_eta": ETA, "n_heads": len(grid), "grid": result.grid, "seed": args.seed}  # fmt: skip
    sizes = {"n": [len(source), len(test.labels)], "feature_dim": int(test.features.shape[1])}
    return Report("linear evaluation (paper: best head of the grid)", [dict(result.best)], {**settings, **sizes, **protocol})
