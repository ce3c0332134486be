"""Evaluation batches for ``carp-fast eval``, from the project's own pipelines.

Each loader yields ``(images [N, 3, S, S] float32 normalised, labels [N] int64)`` through
``carp_fast.pipelines.eval_loader`` (DALI when installed, else torchvision; the shorter side resized to
``resize``, None for none, then a centre crop of ``size``), the same evaluation views that
training's k-NN monitor uses. ``--data`` means what it means for training
(:func:`carp_fast.pipelines.open_split`).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch

def split_batches(data: str, split: str, *, size: int, resize: int | None, batch_size: int, workers: int,
                  backend: str = "auto", device: str | None = None, limit: int | None = None,
                  seed: int = 0) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    """Batches of one split (``"train"`` or ``"test"``) of ``data``.

    Args:
        limit: keep a fixed random subset of this many images (``source.subset(limit, seed)``,
            chosen before any image is decoded); None or more than the split: all of it.
    """
    from carp_fast.pipelines import eval_loader, open_split

    source = open_split(data, split)
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
