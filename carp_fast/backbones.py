"""Backbones: the one registry of architectures, ResNets (torchvision) and ViTs (timm).

ResNets, with the classifier removed:

- ``"resnet50"``: torchvision ResNet-50, ``zero_init_residual=True``, 2048-d features.
- ``"resnet18"``: torchvision ResNet-18 as it is (ImageNet stem), 512-d features.
- ``"resnet18_small"``: torchvision ResNet-18 with a 3x3 stride-1 stem and no max-pool
  (the usual CIFAR-style variant), 512-d features, for 28-64 px images.
- ``"resnet10_tiny"``: the same small-image stem, one BasicBlock per stage and half the
  widths (32-256), 256-d features: about 10x cheaper, for CPU runs on 28 px images.

All keep torchvision's module names, so an exported backbone state dict loads into
``torchvision.models.resnet50()`` (or :func:`build_backbone("resnet18_small")`) with
``strict=False`` reporting only the missing ``fc.*`` keys.

ViTs, from timm with ``dynamic_img_size=True`` so that global and local crops go through the
same weights (the position grid is interpolated); the feature is the class token:

- ``"vit_small"``: ViT-S/16, 384-d features (MaSSL's and SOP's published backbone).
- ``"vit_base"``: ViT-B/16, 768-d features.
- ``"vit_mini_p2"``: a ViT for 10-28 px images (the embedded recipes' crops): 2 px patches (8 x 8
  tokens at 16 px), width 128, 6 blocks of 4 heads, 128-d features; 154 MFLOP a 16 px image,
  about 5x ``resnet10_tiny``'s 32 (``torch.utils.flop_counter``).
"""

from __future__ import annotations

import torch.nn as nn
import torchvision

RESNETS = ("resnet50", "resnet18_small", "resnet18", "resnet10_tiny")
# Our name -> (timm's model name, what differs from it). vit_small/vit_base: patch 16, 224 px
# position grid, as the official ones.
VITS = {
    "vit_small": ("vit_small_patch16_224", {}),
    "vit_base": ("vit_base_patch16_224", {}),
    "vit_mini_p2": ("vit_tiny_patch16_224", dict(patch_size=2, img_size=16, embed_dim=128, depth=6, num_heads=4)),
}
ARCHITECTURES = RESNETS + tuple(VITS)


def build_backbone(arch: str = "resnet50", drop_path: float = 0.0) -> nn.Module:
    """A backbone without classifier: images ``[N, 3, H, W]`` -> features ``[N, F]``.

    Args:
        arch: one of :data:`ARCHITECTURES`.
        drop_path: a ViT's stochastic depth (MaSSL: student 0.1, teacher 0); ResNets have none.

    Returns:
        the module, with the feature width F stored as ``module.feature_dim`` (2048 for
        ResNet-50, 512 for ResNet-18, 384 for ViT-S). No pretrained weights.
    """
    if arch in VITS:
        return _timm_vit(*VITS[arch], drop_path)
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


def _timm_vit(name: str, overrides: dict, drop_path: float) -> nn.Module:
    """timm's ViT ``name`` (with ``overrides`` of its constructor) with no classifier, the class
    token as feature, any input size that is a multiple of the patch."""
    import timm  # imported only for ViTs

    net = timm.create_model(
        name, pretrained=False, num_classes=0, global_pool="token", dynamic_img_size=True, drop_path_rate=drop_path,
        **overrides,
    )
    nn.init.trunc_normal_(net.cls_token, std=0.02)  # the official MaSSL/DINO init (timm's: normal, std 1e-6)
    net.feature_dim = net.num_features
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
