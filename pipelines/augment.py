"""Multi-crop augmentation parameters, shared by the DALI and torchvision paths.

The recipe is BYOL/DINO's (CARP paper appendix C.1): random resized crop (bicubic),
horizontal flip, colour jitter, grayscale, Gaussian blur, solarize, ImageNet
normalisation. Global crops are asymmetric: global 1 is always blurred and never
solarized, global 2 is rarely blurred and sometimes solarized.

This module only *describes* the augmentations (pure data, no imports of DALI or
torchvision); `dali_augment.py` and `torch_augment.py` turn one `CropSpec` into ops.
"""

from __future__ import annotations

from dataclasses import dataclass, field

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CropSpec:
    """Everything needed to produce one crop (view) of an image.

    Probabilities are per image and independent per crop.
    """

    size: int  # output side S: the crop is [3, S, S]
    scale: tuple[float, float]  # area fraction range of the random resized crop
    ratio: tuple[float, float]  # aspect ratio range of the random resized crop
    flip_p: float
    jitter: tuple[float, float, float, float]  # brightness, contrast, saturation, hue
    jitter_p: float
    grayscale_p: float
    blur_sigma: tuple[float, float]
    blur_p: float
    solarize_p: float

    @property
    def blur_kernel(self) -> int:
        """Odd blur window, about 10 % of the crop side (BYOL: 23 px at 224 px).

        Both backends use this fixed window so their blurs agree.
        """
        k = max(3, int(0.1 * self.size))
        return k if k % 2 == 1 else k + 1


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
    if len(value) != 2 or not (low <= value[0] <= value[1] <= high):
        raise ValueError(f"{name} must be a pair (a, b) with {low} <= a <= b <= {high}, got {value!r}")


def _check_prob(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a probability in [0, 1], got {value!r}")


@dataclass(frozen=True)
class MultiCropConfig:
    """n global crops at G px and m local crops at L px (default 2 x 224 + 6 x 96).

    Per-crop probabilities given as tuples are cycled over the global crops: with
    `global_blur_p=(1.0, 0.1)` global crop 0 is always blurred, global crop 1 with
    probability 0.1, global crop 2 (if any) always again, and so on.

    Example (Fashion-MNIST): `MultiCropConfig(global_size=28, local_size=14, local_crops=2)`.
    """

    global_crops: int = 2
    global_size: int = 224
    local_crops: int = 6
    local_size: int = 96
    global_scale: tuple[float, float] = (0.2, 1.0)
    local_scale: tuple[float, float] = (0.05, 0.2)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.2, 0.1)
    jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    global_blur_p: tuple[float, ...] = (1.0, 0.1)
    local_blur_p: float = 0.5
    global_solarize_p: tuple[float, ...] = (0.0, 0.2)
    local_solarize_p: float = 0.0
    mean: tuple[float, float, float] = field(default=IMAGENET_MEAN)
    std: tuple[float, float, float] = field(default=IMAGENET_STD)

    def __post_init__(self) -> None:
        if self.global_crops < 1:
            raise ValueError(f"global_crops must be >= 1, got {self.global_crops}")
        if self.local_crops < 0:
            raise ValueError(f"local_crops must be >= 0, got {self.local_crops}")
        for name in ("global_size", "local_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive number of pixels, got {getattr(self, name)}")
        _check_range("global_scale", self.global_scale, 1e-6, 1.0)
        _check_range("local_scale", self.local_scale, 1e-6, 1.0)
        _check_range("ratio", self.ratio, 1e-6, float("inf"))
        _check_range("blur_sigma", self.blur_sigma, 1e-6, float("inf"))
        if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
            raise ValueError(f"jitter must be (brightness, contrast, saturation, hue) >= 0 with hue <= 0.5, got {self.jitter!r}")
        for name in ("flip_p", "jitter_p", "grayscale_p", "local_blur_p", "local_solarize_p"):
            _check_prob(name, getattr(self, name))
        for name in ("global_blur_p", "global_solarize_p"):
            values = getattr(self, name)
            if len(values) == 0:
                raise ValueError(f"{name} needs at least one probability, got {values!r}")
            for v in values:
                _check_prob(name, v)
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std must have 3 entries (std > 0), got mean={self.mean!r} std={self.std!r}")

    @property
    def num_crops(self) -> int:
        """V = global_crops + local_crops."""
        return self.global_crops + self.local_crops

    def crop_specs(self) -> list[CropSpec]:
        """One `CropSpec` per view, global crops first: [g_0..g_{n-1}, l_0..l_{m-1}]."""
        common = dict(ratio=self.ratio, flip_p=self.flip_p, jitter=self.jitter, jitter_p=self.jitter_p,
                      grayscale_p=self.grayscale_p, blur_sigma=self.blur_sigma)
        specs = [
            CropSpec(size=self.global_size, scale=self.global_scale,
                     blur_p=self.global_blur_p[i % len(self.global_blur_p)],
                     solarize_p=self.global_solarize_p[i % len(self.global_solarize_p)], **common)
            for i in range(self.global_crops)
        ]
        specs += [
            CropSpec(size=self.local_size, scale=self.local_scale, blur_p=self.local_blur_p,
                     solarize_p=self.local_solarize_p, **common)
            for _ in range(self.local_crops)
        ]
        return specs


def solarize_table() -> list[int]:
    """Lookup table of solarize at threshold 128 on uint8: v -> 255 - v for v >= 128."""
    return [v if v < 128 else 255 - v for v in range(256)]
