"""The paper's linear grid: every head trained in one pass equals that setting trained alone."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from carp_fast.eval.linear_grid import GRID, Setting, learning_rate, linear_grid
from carp_fast.lars import LARS

GRID_SMALL = [Setting(lr, wd, opt) for lr in (0.05, 0.5) for wd in (0.0, 1e-2) for opt in ("sgd", "lars")]
N, D, C, EPOCHS, BATCH = 24, 6, 3, 3, 8


def _epoch_features(epoch):
    """A different, deterministic set of 'augmented' features every epoch."""
    g = torch.Generator().manual_seed(100 + epoch)
    labels = torch.arange(N) % C
    x = torch.randn(N, D, generator=g) + 2.0 * F.one_hot(labels, D).float()
    return [(x[i : i + BATCH], labels[i : i + BATCH]) for i in range(0, N, BATCH)]


def _alone(h, setting, scale):
    """Reference: one nn.Linear and a torch optimiser (SGD, or the project's LARS)."""
    head = nn.Linear(D, C)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        head.weight.copy_(0.01 * torch.randn(len(GRID_SMALL), C, D, generator=g)[h])
        head.bias.zero_()
    lr = setting.lr * scale
    if setting.optimizer == "sgd":
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=setting.weight_decay)
    else:
        opt = LARS(head.parameters(), lr=lr, momentum=0.9, weight_decay=setting.weight_decay, eta=0.001)
    for epoch in range(EPOCHS):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * epoch / EPOCHS))
        for x, y in _epoch_features(epoch):
            loss = F.cross_entropy(head(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return head


@pytest.mark.parametrize("lr_batch_size", [None, 512])
def test_grid_heads_equal_settings_trained_alone(lr_batch_size):
    g = torch.Generator().manual_seed(7)
    test_y = torch.arange(30) % C
    test_x = torch.randn(30, D, generator=g) + 2.0 * F.one_hot(test_y, D).float()
    result = linear_grid(_epoch_features, test_x, test_y, num_classes=C, grid=GRID_SMALL, epochs=EPOCHS,
                         lr_batch_size=lr_batch_size, device="cpu")  # fmt: skip
    scale = 1.0 if lr_batch_size is None else lr_batch_size / 256
    accuracies = []
    for h, setting in enumerate(GRID_SMALL):
        head = _alone(h, setting, scale)
        torch.testing.assert_close(result.weight[h], head.weight.detach(), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(result.bias[h], head.bias.detach(), rtol=1e-4, atol=1e-6)
        top1 = 100.0 * (head(test_x).argmax(1) == test_y).float().mean().item()
        assert result.grid[h]["top1"] == pytest.approx(top1)
        accuracies.append(top1)
    assert result.best["top1"] == max(accuracies)
    assert result.best == result.grid[accuracies.index(max(accuracies))]


def test_ibot_grid_and_schedules():
    assert len(GRID) == 45 * 2 * 2 and {s.optimizer for s in GRID} == {"sgd", "lars"}
    assert min(s.lr for s in GRID) == pytest.approx(1e-4) and max(s.lr for s in GRID) == pytest.approx(9.0)
    assert learning_rate(0.03, 11, 20, "multistep", (12, 18)) == pytest.approx(0.03)
    assert learning_rate(0.03, 12, 20, "multistep", (12, 18)) == pytest.approx(0.003)
    assert learning_rate(0.03, 19, 20, "multistep", (12, 18)) == pytest.approx(0.0003)
    assert learning_rate(1.0, 0, 10) == 1.0 and learning_rate(1.0, 5, 10) == pytest.approx(0.5)


def test_grid_errors():
    x, y = torch.randn(4, D), torch.arange(4) % C
    with pytest.raises(ValueError, match="grid must hold"):
        linear_grid(lambda e: [], x, y, num_classes=C, grid=[Setting(0.1, 0.0, "adam")])
    with pytest.raises(ValueError, match="schedule must be one of"):
        learning_rate(0.1, 0, 10, "step")
