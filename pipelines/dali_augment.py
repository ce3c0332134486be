"""DALI graph versions of the crops in `augment.py`: pure functions on DataNodes, no I/O.

Shared by the encoded-file and in-memory-array pipelines (`dali_loader.py`), and by the
'cpu' and 'gpu' devices: every op here runs on the device its input lives on, random
numbers are CPU argument inputs either way. Inputs are uint8 HWC RGB batches.

Mapping to the torchvision reference (`torch_augment.py`):
- colour jitter + grayscale are one `color_twist` per crop; a skipped jitter is the
  identity (factors 1, hue 0) and grayscale is saturation 0 (same BT.601 luma as
  torchvision's `Grayscale`). The four jitter ops run in a fixed order (torchvision
  shuffles them);
- blur and solarize run only on the images that drew them (DALI conditionals split the
  batch), so a p = 0.1 blur costs about a tenth of a full one;
- the flip is folded into `crop_mirror_normalize` (flipping commutes with the colour
  ops and with the symmetric blur).
"""

from __future__ import annotations

import nvidia.dali.fn as fn
import nvidia.dali.types as types

from carp_fast.pipelines.augment import CropSpec, solarize_table


# The 'mixed' (nvJPEG) decoder's settings, named with why (none has run on a GPU here yet):
MIXED_DECODER = dict(
    # Share of the JPEGs sent to the A100/H100 hardware JPEG decoder, the rest going to the CUDA
    # decoder: DALI's default, stated so that it is one place to tune (`carp-fast bench-data` on the
    # GPU, per NVIDIA's A100 decoder blog the best share depends on the number of DALI threads).
    hw_decoder_load=0.65,
    # Per-thread device and pinned host buffers big enough for the largest ImageNet JPEGs, as in
    # NVIDIA's ResNet-50 DALI example: no reallocation mid-epoch when a large image comes
    # (DALI's defaults are 16 MiB and 8 MiB). Costs about 200 MiB of GPU and 134 MiB of pinned
    # host memory per DALI thread, in DALI's own pool.
    device_memory_padding=211025920,
    host_memory_padding=140544512,
    # The hardware decoder preallocates for the largest ImageNet image (5980 x 6430), same example.
    preallocate_width_hint=5980,
    preallocate_height_hint=6430,
)


def decode(encoded, gpu: bool):
    """Encoded bytes -> uint8 [H, W, 3] RGB (CMYK / grayscale converted by the decoder).

    'mixed' = nvJPEG on the GPU (output on the GPU, with `MIXED_DECODER`'s settings);
    'cpu' = libjpeg-turbo.
    """
    if gpu:
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB, **MIXED_DECODER)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


def _uniform(low: float, high: float):
    """A per-sample uniform draw; a constant when the range is empty (DALI rejects it)."""
    return fn.random.uniform(range=(low, high)) if high > low else float(low)


def _coin(p: float):
    return fn.random.coin_flip(probability=p, dtype=types.BOOL)


def _jitter_and_grayscale(x, spec: CropSpec):
    b, c, s, h = spec.jitter
    on = fn.cast(fn.random.coin_flip(probability=spec.jitter_p), dtype=types.FLOAT)
    gray = fn.cast(fn.random.coin_flip(probability=spec.grayscale_p), dtype=types.FLOAT)

    def factor(r: float):  # torchvision: uniform [max(0, 1 - r), 1 + r]; identity (1) when off
        return 1.0 + on * (_uniform(max(0.0, 1.0 - r), 1.0 + r) - 1.0)

    hue = on * _uniform(-360.0 * h, 360.0 * h)  # torchvision's hue is a fraction of a turn
    return fn.color_twist(x, brightness=factor(b), contrast=factor(c), saturation=factor(s) * (1.0 - gray), hue=hue)


def _blur(x, spec: CropSpec):
    return fn.gaussian_blur(x, sigma=_uniform(*spec.blur_sigma), window_size=spec.blur_kernel)


def _solarize(x):
    return fn.lookup_table(x, keys=list(range(256)), values=solarize_table(), dtype=types.UINT8)


def _maybe(x, p: float, op):
    """`op(x)` with probability p per image; uint8 [H, W, 3] in and out.

    p >= 1: always, no coin; p == 0: the op is not in the graph at all; otherwise a DALI
    conditional runs the op only on the images whose coin came up (cost ~ p).
    """
    if p >= 1.0:
        return op(x)
    if p > 0:
        if _coin(p):  # rewritten by DALI's conditionals (enable_conditionals=True) into a batch split
            x = op(x)
    return x


def normalize(x, mean, std, **crop_args):
    """uint8 HWC -> float32 CHW, (x / 255 - mean) / std; `crop_args` crop or mirror too."""
    return fn.crop_mirror_normalize(x, mean=[255.0 * m for m in mean], std=[255.0 * s for s in std],
                                    dtype=types.FLOAT, output_layout="CHW", **crop_args)


def crop_view(images, spec: CropSpec, mean, std):
    """uint8 [H, W, 3] -> float32 [3, S, S]: one random view as described by `spec`."""
    x = fn.random_resized_crop(images, size=(spec.size, spec.size), random_area=spec.scale,
                               random_aspect_ratio=spec.ratio, interp_type=types.INTERP_CUBIC, antialias=True)
    if spec.jitter_p > 0 or spec.grayscale_p > 0:
        x = _jitter_and_grayscale(x, spec)
    x = _maybe(x, spec.blur_p, lambda v: _blur(v, spec))
    x = _maybe(x, spec.solarize_p, _solarize)
    return normalize(x, mean, std, mirror=fn.random.coin_flip(probability=spec.flip_p))


def multicrop_views(images, specs: list[CropSpec], mean, std) -> list:
    """Decoded images -> one DataNode per spec: every crop is cut from the same decode."""
    return [crop_view(images, spec, mean, std) for spec in specs]


def _centre_anchor(excess):
    """Centre-crop offset as torchvision computes it: round((H - S) / 2), halves to even."""
    half = excess // 2
    return half + (excess % 2) * (half % 2)


def eval_view(images, size: int, resize: int | None, mean, std):
    """uint8 [H, W, 3] -> float32 [3, size, size]: resize shorter side (bicubic), centre crop.

    Sizes and offsets follow torchvision's integer arithmetic exactly (longer side
    floor(resize * long / short), offset rounded half to even), so evaluation numbers
    do not depend on the backend: DALI's own `resize_shorter` and `crop_pos` round
    differently and shift the crop by a pixel on some images.
    """
    shape = images.shape(dtype=types.INT32)  # [H, W, C] per sample, on the CPU
    h, w = shape[0], shape[1]
    if resize is not None:
        h_short = fn.cast(h <= w, dtype=types.INT32)
        h, w = (h_short * resize + (1 - h_short) * ((resize * h) // w),
                (1 - h_short) * resize + h_short * ((resize * w) // h))
        images = fn.resize(images, size=fn.cast(fn.stack(h, w), dtype=types.FLOAT),
                           interp_type=types.INTERP_CUBIC, antialias=True)

    def pos(extent):  # normalised crop position giving the torchvision offset; centred pad if smaller
        excess = extent - size
        fits = fn.cast(excess > 0, dtype=types.FLOAT)
        return fits * fn.cast(_centre_anchor(excess), dtype=types.FLOAT) / fn.cast(excess + (1 - fits), dtype=types.FLOAT) \
            + (1.0 - fits) * 0.5

    return normalize(images, mean, std, crop=(size, size), crop_pos_x=pos(w), crop_pos_y=pos(h),
                     out_of_bounds_policy="pad")
