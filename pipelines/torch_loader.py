"""torchvision backend: a map-style dataset + torch DataLoader with workers.

Used where DALI is not installed, and as the reference the DALI path is compared with.
Each sample's augmentations are seeded from (seed, shard, epoch, index), so a batch is
reproducible whatever the number of workers. Decoding is torchvision's libjpeg-turbo
(`decode_image`) on the bytes the source returns; each image is decoded once and every
crop is cut from the decoded tensor. libjpeg prints its warnings (`Corrupt JPEG data: ...`,
data damaged in the middle of a file, which the pre-flight scan does not read) straight to
stderr without a file name: they are caught there and warned about again with the file's name.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import warnings
from functools import partial
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, default_collate
from torchvision.io import ImageReadMode, decode_image

from carp_fast.pipelines.augment import MultiCropConfig
from carp_fast.pipelines.epoch_loader import EpochLoader
from carp_fast.pipelines.sharding import augment_seed, batches
from carp_fast.pipelines.torch_augment import crop_transform, eval_transform


def read_image(source, i: int) -> torch.Tensor:
    """Image i of `source` as uint8 [3, H, W]; a JPEG that libjpeg decodes with a complaint
    (corrupt data) is named in a warning."""
    if source.is_encoded:
        data = torch.from_numpy(source.encoded(i))
        try:
            with _decoder_messages() as messages:
                image = decode_image(data, mode=ImageReadMode.RGB)
        except RuntimeError as e:
            raise RuntimeError(f"could not decode {source.name(i)}: {e}") from e
        if messages:
            warnings.warn(f"{source.name(i)}: {'; '.join(messages)} (decoded as far as its data go)", stacklevel=2)
        return image
    return torch.from_numpy(source.arrays(np.array([i]))[0]).permute(2, 0, 1)


_capture: tuple[int, int] | None = None  # (pid, descriptor) of this process's capture file


@contextlib.contextmanager
def _decoder_messages():
    """Collect what the decoder writes to stderr (file descriptor 2, where libjpeg prints) in the
    block: its JPEG lines into the list yielded, anything else (another thread's) back to stderr.

    A temporary file of this process (a forked worker opens its own) takes fd 2 for the block:
    five system calls an image, no pipe that a long message could fill.
    """
    global _capture
    lines: list[str] = []
    if os.name != "posix":
        yield lines
        return
    if _capture is None or _capture[0] != os.getpid():
        fd, name = tempfile.mkstemp(prefix="carp_fast-decoder-")
        os.unlink(name)
        _capture = (os.getpid(), fd)
    fd, saved = _capture[1], os.dup(2)
    os.dup2(fd, 2)
    try:
        yield lines
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        size = os.fstat(fd).st_size
        if size:
            text = os.pread(fd, size, 0).decode(errors="replace")
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)  # fd 2 wrote through the same offset
            ours = [line for line in text.splitlines() if "JPEG" in line or "jpeg" in line]
            lines.extend(ours)
            others = "".join(line for line in text.splitlines(keepends=True) if line.rstrip("\n") not in ours)
            if others:
                os.write(2, others.encode())


class _ViewsDataset(Dataset):
    """Item `(index, sample_seed)` -> `(*views, label)`; one transform per view."""

    def __init__(self, source, transforms: list[Callable]) -> None:
        self.source, self.transforms = source, transforms

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, item: tuple[int, int]):
        index, sample_seed = item
        image = read_image(self.source, index)
        # fork_rng: seeding must not disturb the caller's RNG when workers=0.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            views = [t(image) for t in self.transforms]
        return (*views, torch.tensor(self.source.labels[index], dtype=torch.int64))


class TorchvisionLoader(EpochLoader):
    """Pretraining (multi-crop) or evaluation loader on torchvision + torch DataLoader.

    `transforms` holds one `make(mean, std) -> transform` per view: the normalisation uses
    the loader's own mean and std.
    """

    backend = "torchvision"
    skips_exactly = True  # each image's augmentations are seeded from its index, not from a stream

    def __init__(self, source, *, transforms: list[Callable], workers: int, **kw) -> None:
        super().__init__(source, **kw)
        if workers < 0:
            raise ValueError(f"workers must be >= 0, got {workers}")
        self.workers = workers
        self._dataset = _ViewsDataset(source, [make(self.mean, self.std) for make in transforms])

    def _produce(self, order: np.ndarray, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        base = augment_seed(self.seed, self.shard_id, epoch)
        # torch's CPU generator keeps only 32 bits of a seed: mix (base, index) into 32 bits,
        # a bijection over the indices of one epoch (odd multiplier mod 2**32).
        items = [[(int(i), (base + int(i) * 0x9E3779B1) & 0xFFFFFFFF) for i in b] for b in batches(order, self.bs)]
        loader = DataLoader(self._dataset, batch_sampler=items, num_workers=self.workers,
                            collate_fn=default_collate, pin_memory=self.device.type == "cuda",
                            prefetch_factor=4 if self.workers else None)
        for batch in loader:
            yield tuple(batch)


def torchvision_pretrain_loader(source, crops: MultiCropConfig, *, workers: int, **kw) -> TorchvisionLoader:
    transforms = [partial(crop_transform, spec) for spec in crops.crop_specs()]
    return TorchvisionLoader(source, transforms=transforms, workers=workers, train=True, mean=crops.mean, std=crops.std, **kw)


def torchvision_eval_loader(source, *, size: int, resize: int | None, mean, std, workers: int, **kw) -> TorchvisionLoader:
    return TorchvisionLoader(source, transforms=[partial(eval_transform, size, resize)], workers=workers,
                             train=False, seed=0, mean=mean, std=std, **kw)
