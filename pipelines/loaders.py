"""Public entry points: `pretrain_loader` and `eval_loader`, on DALI or torchvision.

Shard id and count come from Accelerate at the call site:

    acc = Accelerator()
    train = pretrain_loader(ImageFolderSource("imagenet/train"), MultiCropConfig(), batch_size=64,
                            device=acc.device, shard_id=acc.process_index, num_shards=acc.num_processes)
"""

from __future__ import annotations

from carp_fast.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, MultiCropConfig
from carp_fast.pipelines.epoch_loader import EpochLoader
from carp_fast.pipelines.sources import as_source

BACKENDS = ("auto", "dali", "torchvision")


def dali_available() -> bool:
    """True when NVIDIA DALI and its PyTorch plugin can be imported."""
    try:
        import nvidia.dali.plugin.pytorch  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str) -> str:
    """'auto' -> 'dali' if importable else 'torchvision'; validates the name."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "dali" if dali_available() else "torchvision"
    if backend == "dali" and not dali_available():
        raise ValueError("backend='dali' but nvidia.dali is not installed; pip install nvidia-dali-cuda120 "
                         "or use backend='torchvision'")
    return backend


def pretrain_loader(source, crops: MultiCropConfig | None = None, *, batch_size: int, backend: str = "auto",
                    device=None, shard_id: int = 0, num_shards: int = 1, seed: int = 0, workers: int = 2,
                    strict: bool = False) -> EpochLoader:
    """Multi-crop pretraining batches, drop-last, a new shuffle per epoch.

    Args:
        source: an `ImageFolderSource`, `FileListSource`, `ArraySource` or a folder path.
        crops: the views to produce (default: 2 x 224 + 6 x 96, DINO/BYOL augmentations).
        batch_size: N, images per step on this rank.
        backend: "auto" (DALI if importable), "dali" or "torchvision".
        device: where batches are delivered (default: current CUDA device, else CPU). With
            DALI on a CUDA device, decoding and augmentation run on that GPU.
        shard_id, num_shards: global rank and world size.
        seed: the same on every rank; orders and augmentation seeds derive from it.
        workers: DALI threads or torch DataLoader worker processes.
        strict: raise one ValueError listing broken files instead of skipping them.

    Returns:
        An iterable with exact `len()`; each step yields
        `(g_0, ..., g_{n-1}, l_0, ..., l_{m-1}, labels)`: crops float32 `[N, 3, S, S]`,
        labels int64 `[N]` (-1 when unlabelled). `set_epoch(e)` selects the next epoch.
    """
    crops = crops if crops is not None else MultiCropConfig()
    if not isinstance(crops, MultiCropConfig):
        raise ValueError(f"crops must be a MultiCropConfig, got {type(crops).__name__}")
    source = as_source(source).check(strict=strict)
    kw = dict(batch_size=batch_size, device=device, shard_id=shard_id, num_shards=num_shards, seed=seed, workers=workers)
    if resolve_backend(backend) == "dali":
        from carp_fast.pipelines.dali_loader import dali_pretrain_loader

        return dali_pretrain_loader(source, crops, **kw)
    from carp_fast.pipelines.torch_loader import torchvision_pretrain_loader

    return torchvision_pretrain_loader(source, crops, **kw)


def eval_loader(source, *, size: int = 224, resize: int | None = 256, batch_size: int, backend: str = "auto",
                device=None, shard_id: int = 0, num_shards: int = 1, workers: int = 2, strict: bool = False,
                mean=IMAGENET_MEAN, std=IMAGENET_STD) -> EpochLoader:
    """Evaluation batches: resize the shorter side to `resize` (None: no resize), centre crop `size`.

    Every image of this shard exactly once, fixed order, no drop-last (the last batch
    may be short). Yields `(images [N, 3, size, size] float32, labels [N] int64)`.
    For 28 px Fashion-MNIST: `size=28, resize=None`.
    """
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    if resize is not None and resize < size:
        raise ValueError(f"resize ({resize}) must be >= size ({size}), or None for no resize")
    source = as_source(source).check(strict=strict)
    kw = dict(size=size, resize=resize, mean=mean, std=std, batch_size=batch_size, device=device,
              shard_id=shard_id, num_shards=num_shards, workers=workers)
    if resolve_backend(backend) == "dali":
        from carp_fast.pipelines.dali_loader import dali_eval_loader

        return dali_eval_loader(source, **kw)
    from carp_fast.pipelines.torch_loader import torchvision_eval_loader

    return torchvision_eval_loader(source, **kw)
