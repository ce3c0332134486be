"""Backbones: torchvision ResNets with the classifier removed.

Four architectures (DESIGN.md section 1, issue 2):

- ``"resnet50"``: torchvision ResNet-50, ``zero_init_residual=True``, 2048-d features.
- ``"resnet18"``: torchvision ResNet-18 as it is (ImageNet stem), 512-d features.
- ``"resnet18_small"``: torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool
  (the usual CIFAR-style variant), 512-d features, for 28-64 px images.
- ``"resnet10_tiny"``: the same small-image stem, one BasicBlock per stage and half the
  widths (32-256), 256-d features: about 10x cheaper, for CPU runs on 28 px images.

All keep torchvision's module names, so an exported backbone state dict loads into
``torchvision.models.resnet50()`` (or :func:`build_backbone("resnet18_small")`) with
``strict=False`` reporting only the missing ``fc.*`` keys.
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

ARCHITECTURES = ("resnet50", "resnet18_small", "resnet18", "resnet10_tiny")


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
    elif arch == "resnet10_tiny":
        net = _narrow_small_resnet(blocks=(1, 1, 1, 1), width=32)
    else:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    net.feature_dim = net.fc.in_features
    net.fc = nn.Identity()
    return net


def _narrow_small_resnet(blocks: tuple[int, ...], width: int) -> torchvision.models.ResNet:
    """A torchvision ResNet with BasicBlocks, stage widths ``width * (1, 2, 4, 8)``, a 3x3
    stride-1 stem and no max-pool; module names stay torchvision's."""
    from torchvision.models.resnet import BasicBlock

    net = torchvision.models.ResNet(BasicBlock, list(blocks))
    net.inplanes = width
    net.conv1 = nn.Conv2d(3, width, kernel_size=3, stride=1, padding=1, bias=False)
    net.bn1 = nn.BatchNorm2d(width)
    net.maxpool = nn.Identity()
    for i, n in enumerate(blocks):  # _make_layer builds from net.inplanes onwards
        setattr(net, f"layer{i + 1}", net._make_layer(BasicBlock, width * 2**i, n, stride=1 if i == 0 else 2))
    net.fc = nn.Linear(net.inplanes, 1000)
    for m in net.modules():  # torchvision's initialisation, with zero_init_residual
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    for m in net.modules():
        if isinstance(m, BasicBlock):
            nn.init.zeros_(m.bn2.weight)
    return net
