"""Evaluation batches for ``carp-fast eval``, from the project's own pipelines.

Each loader yields ``(images [N, 3, S, S] float32 normalised, labels [N] int64)`` through
``carp_fast.pipelines.eval_loader`` (DALI when installed, else torchvision; the shorter side resized to
``resize``, None for none, then a centre crop of ``size``), the same evaluation views that
training's k-NN monitor uses. ``--data`` means what it means for training
(:func:`carp_fast.pipelines.open_split`).

The paper's protocols need other views, built here with PIL / torchvision exactly as the
official scripts do: whole images shrunk with ``thumbnail`` (retrieval), whole images
squashed to a square (copy detection), and a random resized crop + flip of every
training image each epoch (linear probe).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Sequence

import torch

def split_batches(data: str, split: str, *, size: int, resize: int | None, batch_size: int, workers: int,
                  backend: str = "auto", device: str | None = None, limit: int | None = None,
                  seed: int = 0, subset_file: str | os.PathLike | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one split (``"train"`` or ``"test"``) of ``data``.

    Args:
        limit: keep a fixed random subset of this many images (``source.subset(limit, seed)``,
            chosen before any image is decoded); None or more than the split: all of it.
        subset_file: keep only the images it names (:func:`subset_source`).
    """
    from carp_fast.pipelines import eval_loader, open_split

    source = open_split(data, split)
    if subset_file is not None:
        source = subset_source(source, subset_file)
    if limit is not None and limit < len(source):
        source = source.subset(limit, seed)
    return eval_loader(source, size=size, resize=resize, batch_size=batch_size, backend=backend,
                       device=device, workers=workers)


def file_list_batches(paths: Sequence[str], *, size: int, resize: int | None, batch_size: int, workers: int,
                      backend: str = "auto", device: str | None = None) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the images at ``paths`` (retrieval, copy detection); the label of each
    image is its position in ``paths``."""
    from carp_fast.pipelines import FileListSource, eval_loader

    source = FileListSource([(str(path), i) for i, path in enumerate(paths)])
    # strict: a skipped file would shift every later feature against the ground truth.
    return eval_loader(source, size=size, resize=resize, batch_size=batch_size, backend=backend,
                       device=device, workers=workers, strict=True)


# --- whole images (retrieval, copy detection) and augmented crops (linear probe) -------

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class _PathDataset(torch.utils.data.Dataset):
    """``paths[i]`` read with PIL as RGB, ``resize(image)``, then a normalised float32
    tensor ``[3, H, W]``; the label of an image is its position ``i``."""

    def __init__(self, paths: Sequence[str], resize):
        self.paths, self.resize = list(paths), resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image
        from torchvision.transforms.v2 import functional as TF

        try:
            with Image.open(self.paths[i]) as image:
                image = self.resize(image.convert("RGB"))
        except OSError as error:
            raise ValueError(f"could not read image {self.paths[i]!r}: {error}") from None
        x = TF.to_dtype(TF.pil_to_tensor(image), torch.float32, scale=True)
        return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD), i


def _thumbnail(imsize: int):
    def resize(image):
        image.thumbnail((imsize, imsize), _lanczos())  # in place; aspect kept; never enlarges
        return image

    return resize


def _lanczos():
    from PIL import Image

    return Image.Resampling.LANCZOS  # what DINO's Image.ANTIALIAS meant


def thumbnail_batches(paths: Sequence[str], *, imsize: int = 512, workers: int = 2):
    """Whole images one at a time, longer side shrunk to ``imsize`` (PIL ``thumbnail``,
    Lanczos, aspect ratio kept), as DINO's retrieval script: ``(images [1, 3, H, W],
    index [1])``. Sizes differ from image to image, hence batches of one."""
    return torch.utils.data.DataLoader(_PathDataset(paths, _thumbnail(imsize)), batch_size=1,
                                       num_workers=workers)


def squashed_batches(paths: Sequence[str], *, size: int = 320, batch_size: int = 16, workers: int = 2):
    """Whole images squashed to ``size`` x ``size`` (PIL bicubic, aspect ratio not kept), as
    DINO's copy-detection script: ``(images [N, 3, size, size], index [N])``."""
    from PIL import Image

    def resize(image):
        return image.resize((size, size), Image.Resampling.BICUBIC)

    return torch.utils.data.DataLoader(_PathDataset(paths, resize), batch_size=batch_size,
                                       num_workers=workers)


class _AugmentedDataset(torch.utils.data.Dataset):
    """Image ``i`` of a source -> (random resized crop + flip, label); the crop is seeded
    by (seed, epoch, i), so an epoch is the same whatever the number of workers."""

    def __init__(self, source, size: int, seed: int):
        from torchvision.transforms import v2

        self.source, self.seed, self.epoch = source, seed, 0
        self.transform = v2.Compose([
            v2.RandomResizedCrop(size, antialias=True),  # torchvision defaults: scale 0.08-1, bilinear
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])  # fmt: skip

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i: int):
        from carp_fast.pipelines.torch_loader import read_image

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, i)) % 2**63)
            view = self.transform(read_image(self.source, i))
        return view, int(self.source.labels[i])


def augmented_epochs(source, *, size: int = 224, batch_size: int = 256, workers: int = 2, seed: int = 0):
    """``epoch -> batches`` of the paper's linear-probe training views.

    Every epoch, each image of ``source`` once, in a fresh order, as a random resized crop
    of ``size`` (scale 0.08-1, bilinear) with a random horizontal flip (official
    ``eval_linear.py``): ``(images [N, 3, size, size], labels [N])``.
    """
    from carp_fast.pipelines.sources import as_source

    dataset = _AugmentedDataset(as_source(source).check(), size, seed)

    def epoch_batches(epoch: int):
        dataset.epoch = epoch
        order = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=order,
                                           num_workers=workers, persistent_workers=False)

    return epoch_batches


def subset_source(source, names_file: str | os.PathLike):
    """The images of ``source`` named in ``names_file`` (SimCLR's ImageNet subsets: one
    ``nXXXXXXXX_YYYY.JPEG`` per line), labels kept.

    Args:
        source: an ImageNet-layout source (``root/<class>/<image>``, ``classes`` sorted).
        names_file: one file name per line; the class folder is the part before ``_``.

    Raises:
        FileNotFoundError: no list, or a listed image missing from ``source``'s folders.
        ValueError: an empty list, or a class prefix that is not a class of ``source``.
    """
    from carp_fast.pipelines.sources import FileListSource

    names_file = Path(names_file)
    if not names_file.is_file():
        raise FileNotFoundError(f"subset file {str(names_file)!r} does not exist")
    names = [ln.strip() for ln in names_file.read_text().splitlines() if ln.strip()]
    if not names:
        raise ValueError(f"subset file {str(names_file)!r} is empty")
    root, classes = getattr(source, "root", None), getattr(source, "classes", None)
    if root is None or classes is None:
        raise ValueError("--subset-file needs an ImageNet-layout folder (train/<class>/<image>)")
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    for name in names:
        cls = Path(name).name.split("_")[0]
        if cls not in index:
            raise ValueError(f"{names_file}: {name!r} names class {cls!r}, which is not a folder of {root}")
        entries.append((str(Path(root) / cls / Path(name).name), index[cls]))
    return FileListSource(entries)
