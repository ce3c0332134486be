"""Evaluation data sources for the ``carp-fast eval`` command line.

Each source yields batches ``(images [N, 3, S, S] float32 normalised, labels [N] int64)``.
With ``loader="auto"`` the project's ``pipelines.eval_loader`` is used when it exists,
otherwise a built-in minimal loader (no DALI, no augmentation):

- ``fashion-mnist``: the idx files in ``/usr/share/datasets/fashion-mnist`` (Debian
  ``dataset-fashion-mnist``); grey 28 px images repeated to 3 channels, resized to
  ``size`` when it differs from 28, ImageNet mean/std normalisation.
- a directory in ImageNet layout (``DIR/train/<class>/*``, ``DIR/val/<class>/*``, or
  ``DIR/test``): torchvision ``ImageFolder``, resize the short side to ``resize``,
  centre-crop ``size``, ImageNet normalisation.
- a list of image files (retrieval, copy detection): resized to ``size x size`` so they
  batch; the label of each image is its position in the list.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
LOADERS = ("auto", "pipelines", "builtin")


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (MNIST format, optionally gzipped) as a numpy array.

    The header is two zero bytes, a type code (0x08 = uint8) and the number of dims,
    then one big-endian int32 per dim, then the data.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path}: not an idx file of uint8 (header {data[:4]!r})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def fashion_mnist(split: str, root: str | os.PathLike = FASHION_MNIST_DIR) -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST images ``[N, 28, 28]`` uint8 and labels ``[N]`` int64.

    Args:
        split: ``"train"`` (60k) or ``"test"`` (10k).
    """
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images_path = root / f"{prefix}-images-idx3-ubyte.gz"
    if not images_path.exists():
        raise FileNotFoundError(
            f"{images_path} not found; install it with `apt-get install dataset-fashion-mnist`"
        )
    images = torch.from_numpy(read_idx(images_path).copy())
    labels = torch.from_numpy(read_idx(root / f"{prefix}-labels-idx1-ubyte.gz").astype(np.int64))
    return images, labels


def subset_indices(n: int, limit: int | None, seed: int = 0) -> torch.Tensor | None:
    """A fixed random subset of ``limit`` indices out of ``n`` (sorted), or None for all."""
    if limit is None or limit >= n:
        return None
    if limit < 1:
        raise ValueError(f"a split limit must be at least 1, got {limit}")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:limit].sort().values


def builtin_batches(
    data: str,
    split: str,
    *,
    size: int,
    resize: int | None,
    batch_size: int,
    limit: int | None = None,
    workers: int = 0,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one split of ``data`` (``"fashion-mnist"`` or an ImageNet-layout dir)."""
    if data == "fashion-mnist":
        images, labels = fashion_mnist(split)
        index = subset_indices(len(images), limit)
        if index is not None:
            images, labels = images[index], labels[index]
        return _TensorBatches(images, labels, size=size, batch_size=batch_size)

    from torchvision import datasets, transforms

    folder = image_folder_split(data, split)
    transform = transforms.Compose(
        ([] if resize is None else [transforms.Resize(resize, interpolation=transforms.InterpolationMode.BICUBIC)])
        + [
            transforms.CenterCrop(size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = datasets.ImageFolder(folder, transform=transform)
    index = subset_indices(len(dataset), limit)
    if index is not None:
        dataset = torch.utils.data.Subset(dataset, index.tolist())
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


def image_folder_split(root: str | os.PathLike, split: str) -> Path:
    """``root/train`` for ``"train"``; ``root/val`` (else ``root/test``) for the test split."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"--data must be 'fashion-mnist' or a directory, got {str(root)!r}")
    candidates = ["train"] if split == "train" else ["val", "test"]
    for name in candidates:
        if (root / name).is_dir():
            return root / name
    raise ValueError(
        f"{root} has no {' or '.join(candidates)} folder; expected ImageNet layout "
        "DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg"
    )


def pipelines_batches(
    data: str,
    split: str,
    *,
    size: int,
    resize: int | None,
    batch_size: int,
    device: str | None,
    workers: int,
    limit: int | None = None,
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches from the project's ``pipelines.eval_loader`` (DALI when importable, else
    torchvision; shorter side resized to ``resize``, None for none, centre crop ``size``).

    ``limit`` keeps the same fixed random subset as :func:`builtin_batches`, taken from
    the source before any image is decoded.
    """
    import pipelines

    if data == "fashion-mnist":
        source = pipelines.load_fashion_mnist(split)
        index = subset_indices(len(source), limit)
        if index is not None:
            index = index.numpy()
            source = pipelines.ArraySource(
                source.images[index], source.labels[index], num_classes=source.num_classes
            )
    else:
        source = pipelines.ImageFolderSource(image_folder_split(data, split))
        index = subset_indices(len(source), limit)
        if index is not None:
            files, labels = source.files, source.labels
            source = pipelines.FileListSource([(files[i], int(labels[i])) for i in index.tolist()])
    return pipelines.eval_loader(
        source, size=size, resize=resize, batch_size=batch_size, backend="auto",
        device=device, workers=workers,
    )  # fmt: skip


def file_list_batches(
    paths: Sequence[str], *, size: int, batch_size: int, workers: int = 0
) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of the images at ``paths``, resized to ``size x size``, labels = positions."""
    from torchvision import transforms

    transform = transforms.Compose(
        [
            transforms.Resize((size, size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    dataset = _FileList(list(paths), transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers)


class _TensorBatches:
    """uint8 grey images ``[N, H, W]`` -> normalised float batches ``[B, 3, S, S]``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, *, size: int, batch_size: int):
        self.images, self.labels, self.size, self.batch_size = images, labels, size, batch_size
        self.mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.images), self.batch_size):
            x = self.images[start : start + self.batch_size].float().div(255).unsqueeze(1)
            if x.shape[-1] != self.size or x.shape[-2] != self.size:
                x = torch.nn.functional.interpolate(
                    x, size=(self.size, self.size), mode="bilinear", antialias=True
                )
            x = (x.expand(-1, 3, -1, -1) - self.mean) / self.std  # [B, 3, S, S]
            yield x, self.labels[start : start + self.batch_size]


class _FileList(torch.utils.data.Dataset):
    def __init__(self, paths: list[str], transform):
        self.paths, self.transform = paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from PIL import Image

        with Image.open(self.paths[i]) as image:
            return self.transform(image.convert("RGB")), i
