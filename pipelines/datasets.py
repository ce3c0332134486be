"""Data sets by name: ``"fashion-mnist"`` or a folder in the ImageNet layout, one split at a time.

Training (``carp_fast.train``) and evaluation (``carp-fast eval``) open their data through
:func:`open_split`, so ``--data`` means the same thing in both.
"""

from __future__ import annotations

import os
from pathlib import Path

from carp_fast.pipelines.sources import ArraySource, EncodedSource, load_fashion_mnist, open_folder

SPLITS = {"train": ("train",), "test": ("val", "test")}  # sub-folders tried, in order


def open_split(data: str | os.PathLike, split: str, *, root: str | os.PathLike | None = None,
               required: bool = True) -> EncodedSource | ArraySource | None:
    """The source of one split of ``data``.

    Args:
        data: ``"fashion-mnist"`` (idx files in ``root``, else Debian's
            ``/usr/share/datasets/fashion-mnist``, else torchvision's download), or a folder:
            ``DIR/train/<class>/*`` with ``DIR/val/<class>/*`` (or ``DIR/test``), or
            ``DIR/<class>/*`` alone, which is the training split and has no test split; each
            split may instead be a folder of tar shards (``DIR/train/*.tar``, `ShardSource`).
        split: ``"train"`` or ``"test"``.
        root: where Fashion-MNIST's idx files are (ignored for folders).
        required: a folder without a test split raises (True) or gives None.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {sorted(SPLITS)}, got {split!r}")
    if str(data) == "fashion-mnist":
        return load_fashion_mnist(split, root=root)
    folder = Path(data)
    if not folder.is_dir():
        raise FileNotFoundError(f"data {str(folder)!r}: no such folder; give an ImageNet-layout folder or 'fashion-mnist'")
    for name in SPLITS[split]:
        if (folder / name).is_dir():
            return open_folder(folder / name)
    if split == "train":
        return open_folder(folder)  # class folders (or tar shards) directly under DIR
    if required:
        raise FileNotFoundError(
            f"data {str(folder)!r} has no val/ or test/ folder; expected the ImageNet layout "
            "DIR/train/<class>/* and DIR/val/<class>/*"
        )
    return None
