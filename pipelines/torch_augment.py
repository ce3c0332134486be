"""torchvision.transforms.v2 versions of the crops in `augment.py` (the reference path).

Transforms take a uint8 `[3, H, W]` tensor and return float32 `[3, S, S]` normalised.
They draw from torch's global RNG; the dataset seeds it per sample.
"""

from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode, v2

from carp_fast.pipelines.augment import CropSpec


def _to_float(mean, std) -> list:
    return [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]


def crop_transform(spec: CropSpec, mean, std) -> v2.Compose:
    """uint8 [3, H, W] -> float32 [3, S, S]: one random view as described by `spec`."""
    b, c, s, h = spec.jitter
    return v2.Compose([
        v2.RandomResizedCrop(spec.size, scale=spec.scale, ratio=spec.ratio,
                             interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(spec.flip_p),
        v2.RandomApply([v2.ColorJitter(brightness=b, contrast=c, saturation=s, hue=h)], p=spec.jitter_p),
        v2.RandomGrayscale(spec.grayscale_p),
        v2.RandomApply([v2.GaussianBlur(spec.blur_kernel, sigma=spec.blur_sigma)], p=spec.blur_p),
        v2.RandomSolarize(threshold=128, p=spec.solarize_p),
        *_to_float(mean, std),
    ])


def eval_transform(size: int, resize: int | None, mean, std) -> v2.Compose:
    """uint8 [3, H, W] -> float32 [3, size, size]: resize shorter side (bicubic), centre crop."""
    resize_ops = [] if resize is None else [v2.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True)]
    return v2.Compose([*resize_ops, v2.CenterCrop(size), *_to_float(mean, std)])
