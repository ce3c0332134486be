"""Where images come from: image folders, file lists and in-memory uint8 arrays.

A source is a random-access list of N images with labels (`-1` when unlabelled). It
does the I/O and nothing else; augmentation happens in the pipelines. Two kinds:

- encoded sources (`ImageFolderSource`, `FileListSource`, and `ShardSource` in
  `shards.py`): `encoded(i)` returns the image's bytes, decoded later by DALI or
  torchvision. Files are checked by a pre-flight scan (`scan.py`) on first use, done once
  across processes and launches (`scan_cache.py`); broken ones are skipped with a warning,
  or rejected with `check(strict=True)`.
- array sources (`ArraySource`): `arrays(idx)` returns decoded `[B, H, W, 3]` uint8.
"""

from __future__ import annotations

import gzip
import os
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from carp_fast.pipelines.scan import ScanResult, report_bad, scan_files, to_rgb_png
from carp_fast.pipelines.scan_cache import cached_scan

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


class EncodedSource:
    """Base of file-backed sources: candidate files, labels, lazy pre-flight scan.

    `files` [N] and `labels` [N] are those of the usable images: reading either runs the
    scan (once) if `check()` has not. `cache_root`: the data's folder, under which name the
    scan's results are kept for later launches and the other ranks (`scan_cache.py`); None:
    no cache. `scan_seconds`: the time the scan took in this process (0 before it ran).
    """

    is_encoded = True

    def __init__(self, files: list[str], labels: np.ndarray, num_classes: int, where: str,
                 empty_classes: list[str] | None = None, scan: ScanResult | None = None,
                 cache_root: str | None = None) -> None:
        self.cache_root = cache_root
        self.scan_seconds = 0.0
        self._candidates = files
        self._candidate_labels = labels.astype(np.int64)
        self.num_classes = num_classes
        self.where = where
        self.empty_classes = empty_classes or []
        self._scan: ScanResult | None = None
        self._reported = False
        self._strict = False  # check(strict=True): an image gone since the scan is an error too
        self._gone: set[str] = set()  # images found unreadable after the scan
        self._warned: set[str] = set()  # those of them reported (once each)
        if scan is not None:  # already scanned (a subset of a scanned source): no second scan
            self._use_scan(scan)

    def _use_scan(self, scan: ScanResult) -> None:
        self._scan = scan
        self._files = [f for f, k in zip(self._candidates, scan.keep) if k]
        self._labels = self._candidate_labels[scan.keep]
        self._convert = scan.convert[scan.keep]

    def check(self, strict: bool = False) -> "EncodedSource":
        """Scan the files once; warn about (or, strict, raise on) unusable ones."""
        if self._scan is None:
            started = time.perf_counter()
            if self.cache_root is None:
                found = scan_files(self._candidates)
            else:
                found = cached_scan(self._candidates, self.cache_root)
            self.scan_seconds = time.perf_counter() - started
            self._use_scan(found)
        self._strict = self._strict or strict
        if strict:
            report_bad(self._scan.bad, self.empty_classes, self.where, strict=True)
        elif not self._reported:
            report_bad(self._scan.bad, self.empty_classes, self.where, strict=False)
            self._reported = True
        if not self._files:
            raise ValueError(f"no usable images in {self.where}: all {len(self._candidates)} file(s) are broken")
        return self

    @property
    def files(self) -> list[str]:
        """Paths of the usable images [N]."""
        self.check()
        return self._files

    @property
    def bad_files(self) -> list[tuple[str, str]]:
        """(path, reason) of every file the pre-flight scan left out."""
        self.check()
        return list(self._scan.bad)

    @property
    def labels(self) -> np.ndarray:
        """Labels of the usable images [N] int64 (-1 when unlabelled)."""
        self.check()
        return self._labels

    def subset(self, n: int, seed: int = 0) -> "EncodedSource":
        """A fixed random subset of ``n`` of the files (taken before the scan, so that only those
        are read; from the scan's result if the source is already scanned); the source itself
        when ``n`` is not smaller than it."""
        if n >= len(self._candidates):
            return self
        idx = _subset_indices(len(self._candidates), n, seed)
        files = [self._candidates[i] for i in idx]
        scan = None
        if self._scan is not None:
            chosen = set(files)
            scan = ScanResult(keep=self._scan.keep[idx], convert=self._scan.convert[idx],
                              bad=[(f, why) for f, why in self._scan.bad if f in chosen])
        return EncodedSource(files, self._candidate_labels[idx], self.num_classes,
                             f"{self.where} (a subset of {len(idx)})", scan=scan, cache_root=self.cache_root)

    def __len__(self) -> int:
        return len(self.files)

    def encoded(self, i: int) -> np.ndarray:
        """The bytes of image i, `[nbytes]` uint8, in a format every decoder reads as RGB.

        An image that cannot be read any more (deleted, or made unreadable, after the scan) is
        skipped as the scan's broken files are, with one warning naming it: the next readable
        image of its class (else of any) stands in for it, so that batches keep their size,
        epochs their length and every other image its place and augmentations. After
        `check(strict=True)` it is an error naming the file.
        """
        try:
            return self._read(i)
        except OSError as error:  # FileNotFoundError, PermissionError, PIL's UnidentifiedImageError
            return self._stand_in(i, error)

    def _read(self, i: int) -> np.ndarray:
        path = self.files[i]  # scans first if needed, which sets `_convert`
        if self._convert[i]:
            return to_rgb_png(path)
        return np.fromfile(path, dtype=np.uint8)

    def _stand_in(self, i: int, error: OSError) -> np.ndarray:
        """The bytes of the next readable image after unreadable image i (its class first)."""
        path, why = self._files[i], error.strerror or type(error).__name__
        if self._strict:
            raise OSError(f"{path}: unreadable since the pre-flight scan ({why}); strict=False skips it") from error
        n, labels = len(self._files), self._labels
        for same_class in (True, False):
            for d in range(1, n):
                j = (i + d) % n
                if (labels[j] == labels[i]) != same_class or self._files[j] in self._gone:
                    continue
                try:
                    data = self._read(j)
                except OSError:
                    self._gone.add(self._files[j])  # reported when its own turn comes
                    continue
                self._gone.add(path)
                if path not in self._warned:
                    self._warned.add(path)
                    report_bad([(path, f"unreadable since the pre-flight scan: {why}; {self._files[j]} stands in for it")],
                               [], self.where, strict=False)
                return data
        raise OSError(f"no readable image left in {self.where}: {path} and all the others are unreadable ({why})") from error

    def name(self, i: int) -> str:
        return self.files[i]

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.where!r})"


class ImageFolderSource(EncodedSource):
    """ImageNet layout: `root/<class>/<image>`; classes are the sorted sub-folder names.

    Every non-hidden file in a class folder is a candidate image (a stray non-image is
    reported by the scan rather than silently ignored). Empty class folders keep their
    class index, so label numbering matches torchvision's `ImageFolder`.
    """

    def __init__(self, root: str | os.PathLike) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"image folder {str(root)!r} does not exist or is not a directory")
        self.root = root
        self.classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
        if not self.classes:
            raise ValueError(f"image folder {str(root)!r} has no class sub-folders (expected root/<class>/<image>)")
        files, labels, empty = [], [], []
        for label, cls in enumerate(self.classes):
            names = _list_files(str(root / cls))
            if not names:
                empty.append(cls)
            files += names
            labels += [label] * len(names)
        if not files:
            raise ValueError(f"image folder {str(root)!r} holds no files in its {len(self.classes)} class folder(s)")
        super().__init__(files, np.array(labels), len(self.classes), str(root), empty, cache_root=str(root))

    def subset(self, n: int, seed: int = 0) -> EncodedSource:
        """As `EncodedSource.subset`, keeping `root` and `classes` (the labels still index them)."""
        sub = super().subset(n, seed)
        if sub is not self:
            sub.root, sub.classes = self.root, list(self.classes)
        return sub


class FileListSource(EncodedSource):
    """A list of images with labels: a text file of lines `path label` or a Python list.

    Relative paths in a text file are relative to the file's folder (or `root`). The label
    is optional (`-1` when absent). Entries may be `"path label"` strings or
    `(path, label)` pairs. `num_classes` is `max(label) + 1` (0 when unlabelled).
    """

    def __init__(self, path_or_list: str | os.PathLike | Sequence, root: str | os.PathLike | None = None) -> None:
        if isinstance(path_or_list, (str, os.PathLike)):
            list_path = Path(path_or_list)
            if not list_path.is_file():
                raise FileNotFoundError(f"file list {str(list_path)!r} does not exist")
            entries = [ln for ln in list_path.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
            base = Path(root) if root is not None else list_path.parent
            where = str(list_path)
        else:
            entries, base, where = list(path_or_list), Path(root or "."), "the given file list"
        files, labels = [], []
        for entry in entries:
            path, label = self._parse(entry)
            p = Path(path)
            files.append(str(p if p.is_absolute() else base / p))
            labels.append(label)
        if not files:
            raise ValueError(f"file list {where!r} is empty")
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"{len(missing)} file(s) of {where!r} do not exist, e.g. {missing[:3]}")
        labels = np.array(labels, dtype=np.int64)
        super().__init__(files, labels, int(labels.max()) + 1 if (labels >= 0).any() else 0, where,
                         cache_root=os.path.commonpath([os.path.dirname(os.path.abspath(f)) for f in files]))

    @staticmethod
    def _parse(entry) -> tuple[str, int]:
        if isinstance(entry, str):
            parts = entry.rsplit(maxsplit=1)
            if len(parts) == 2 and parts[1].lstrip("-").isdigit():
                return parts[0], int(parts[1])
            return entry.strip(), -1
        path, label = entry
        return str(path), int(label)


class ArraySource:
    """In-memory images: `images` [N, H, W] (grayscale) or [N, H, W, 3] uint8, `labels` [N] int.

    Grayscale images are replicated to 3 channels when read, so one network serves all
    data sets.
    """

    is_encoded = False

    def __init__(self, images: np.ndarray, labels: np.ndarray | None = None, num_classes: int | None = None) -> None:
        images = np.asarray(images)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8, got {images.dtype}")
        if not (images.ndim == 3 or (images.ndim == 4 and images.shape[-1] == 3)):
            raise ValueError(f"images must be [N, H, W] or [N, H, W, 3], got shape {images.shape}")
        if len(images) == 0:
            raise ValueError("images is empty (N = 0)")
        labels = np.full(len(images), -1, np.int64) if labels is None else np.asarray(labels).astype(np.int64)
        if labels.shape != (len(images),):
            raise ValueError(f"labels must be [N] = [{len(images)}], got shape {labels.shape}")
        self.images, self.labels = images, labels
        self.num_classes = num_classes if num_classes is not None else (int(labels.max()) + 1 if (labels >= 0).any() else 0)

    def subset(self, n: int, seed: int = 0) -> "ArraySource":
        """A fixed random subset of ``n`` images (in their original order); the source itself
        when ``n`` is not smaller than it."""
        if n >= len(self.images):
            return self
        idx = _subset_indices(len(self.images), n, seed)
        return ArraySource(self.images[idx], self.labels[idx], num_classes=self.num_classes)

    def check(self, strict: bool = False) -> "ArraySource":
        """Arrays are validated at construction; nothing to scan."""
        return self

    def __len__(self) -> int:
        return len(self.images)

    def arrays(self, idx: np.ndarray) -> np.ndarray:
        """Images `idx` as [B, H, W, 3] uint8 (grayscale replicated)."""
        batch = self.images[idx]
        if batch.ndim == 3:
            batch = np.repeat(batch[..., None], 3, axis=-1)
        return np.ascontiguousarray(batch)

    def name(self, i: int) -> str:
        return f"array image {i}"

    def __repr__(self) -> str:
        return f"ArraySource({self.images.shape}, num_classes={self.num_classes})"


def _list_files(folder: str) -> list[str]:
    """The non-hidden files under ``folder``, recursively, in `Path` order (parts compared in turn).

    What ``sorted(p for p in Path(folder).rglob("*") if p.is_file() and not hidden)`` gives, without
    a `stat` per file: `os.scandir` tells files from folders by the directory entry's type (a stat
    only for symbolic links). Like `rglob`, it does not descend into linked folders.
    """
    found, todo = [], [folder]
    while todo:
        try:
            with os.scandir(todo.pop()) as entries:
                for entry in entries:
                    if entry.is_dir(follow_symlinks=False):
                        todo.append(entry.path)
                    elif not entry.name.startswith(".") and entry.is_file():
                        found.append(entry.path)
        except PermissionError:  # skipped, as by rglob
            continue
    return sorted(found, key=lambda path: path.split(os.sep))


def _subset_indices(total: int, n: int, seed: int) -> np.ndarray:
    if n < 1:
        raise ValueError(f"a subset needs n >= 1 images, got n={n}")
    return np.sort(np.random.default_rng(seed).choice(total, n, replace=False))


def _read_idx(path: Path) -> np.ndarray:
    """Read an idx file (MNIST format, optionally .gz) into a uint8 array."""
    with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> ArraySource:
    """Fashion-MNIST (60k train / 10k test 28 x 28 grayscale, 10 classes) as an `ArraySource`.

    Looks for the idx files (`train-images-idx3-ubyte[.gz]` ...) in `root`, then in
    `/usr/share/datasets/fashion-mnist` (Debian `dataset-fashion-mnist`), then asks
    torchvision to download them (needs a network).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    prefix = "train" if split == "train" else "t10k"
    tried = []
    for folder in ([Path(root)] if root is not None else []) + [Path(FASHION_MNIST_ROOT)]:
        for suffix in (".gz", ""):
            img = folder / f"{prefix}-images-idx3-ubyte{suffix}"
            lab = folder / f"{prefix}-labels-idx1-ubyte{suffix}"
            if img.is_file() and lab.is_file():
                return ArraySource(_read_idx(img), _read_idx(lab), num_classes=10)
        tried.append(str(folder))
    try:
        from torchvision.datasets import FashionMNIST

        cache = Path(root) if root is not None else Path.home() / ".cache" / "carp_fast"
        ds = FashionMNIST(str(cache), train=split == "train", download=True)
        return ArraySource(ds.data.numpy(), ds.targets.numpy(), num_classes=10)
    except Exception as e:
        raise FileNotFoundError(
            f"Fashion-MNIST {split} not found. Tried: idx files in {tried}, and torchvision's download "
            f"({type(e).__name__}: {e}). Fix one of: (1) pass root= a folder holding "
            f"{prefix}-images-idx3-ubyte.gz and {prefix}-labels-idx1-ubyte.gz; (2) `apt-get install "
            f"dataset-fashion-mnist` (installs into {FASHION_MNIST_ROOT}); (3) run once with a network so "
            "torchvision can download it."
        ) from e


def as_source(obj) -> EncodedSource | ArraySource:
    """Accept a source, or a path to an image folder (class sub-folders) or a folder of tar shards."""
    if isinstance(obj, (EncodedSource, ArraySource)):
        return obj
    if isinstance(obj, (str, os.PathLike)):
        return open_folder(obj)
    raise ValueError(f"source must be an ImageFolderSource, FileListSource, ShardSource, ArraySource or a folder path, "
                     f"got {type(obj).__name__}")


def open_folder(path: str | os.PathLike) -> EncodedSource:
    """A `ShardSource` when ``path`` holds ``*.tar`` files, else an `ImageFolderSource`."""
    from carp_fast.pipelines.shards import ShardSource, is_shard_folder

    return ShardSource(path) if is_shard_folder(path) else ImageFolderSource(path)
