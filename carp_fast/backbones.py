"""Backbones: torchvision ResNets with the classifier removed.

Two architectures (DESIGN.md section 1, issue 2):

- ``"resnet50"``: torchvision ResNet-50, ``zero_init_residual=True``, 2048-d features.
- ``"resnet18_small"``: torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool
  (the usual CIFAR-style variant), 512-d features, for 28-64 px images.

Both keep torchvision's module names, so an exported backbone state dict loads into
``torchvision.models.resnet50()`` (or :func:`build_backbone("resnet18_small")`) with
``strict=False`` reporting only the missing ``fc.*`` keys.
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

ARCHITECTURES = ("resnet50", "resnet18_small", "resnet18")


def build_backbone(arch: str = "resnet50") -> nn.Module:
    """A torchvision ResNet whose ``fc`` is ``nn.Identity``.

    Args:
        arch: one of :data:`ARCHITECTURES`.

    Returns:
        a module mapping images ``[N, 3, H, W]`` to features ``[N, D]``, with the feature
        width stored as ``module.feature_dim`` (2048 for ResNet-50, 512 for ResNet-18).
    """
    if arch == "resnet50":
        net = torchvision.models.resnet50(weights=None, zero_init_residual=True)
    elif arch in ("resnet18", "resnet18_small"):
        net = torchvision.models.resnet18(weights=None, zero_init_residual=True)
        if arch == "resnet18_small":
            # Small images: a 7x7 stride-2 stem plus max-pool would leave 1x1 maps at 28 px.
            net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net
