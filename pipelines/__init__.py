"""carp_fast input pipelines: multi-crop pretraining and evaluation views on DALI or torchvision.

    from carp_fast.pipelines import ImageFolderSource, MultiCropConfig, pretrain_loader, crop_dataloaders
"""

from carp_fast.pipelines.augment import IMAGENET_MEAN, IMAGENET_STD, CropSpec, MultiCropConfig
from carp_fast.pipelines.datasets import open_split
from carp_fast.pipelines.epoch_loader import EpochLoader
from carp_fast.pipelines.loaders import dali_available, eval_loader, pretrain_loader
from carp_fast.pipelines.shards import ShardSource
from carp_fast.pipelines.sources import ArraySource, FileListSource, ImageFolderSource, load_fashion_mnist

__all__ = [
    "IMAGENET_MEAN", "IMAGENET_STD", "CropSpec", "MultiCropConfig",
    "CropDataLoaders", "EmptyLoader", "crop_dataloaders", "EpochLoader",
    "dali_available", "eval_loader", "pretrain_loader",
    "ArraySource", "FileListSource", "ImageFolderSource", "ShardSource", "load_fashion_mnist", "open_split",
]


def __getattr__(name: str):
    # The fastai adapter is imported on first use: fastai takes seconds to import and the
    # loaders (and the benchmark) do not need it.
    if name in ("CropDataLoaders", "EmptyLoader", "crop_dataloaders"):
        from carp_fast.pipelines import dataloaders

        return getattr(dataloaders, name)
    raise AttributeError(f"module 'pipelines' has no attribute {name!r}")
