"""Tar shards (the WebDataset layout) as a source: members read by offset from an index.

A shard folder holds ``000000.tar``, ``000001.tar``, ... whose members come in pairs
``KEY.jpg`` (or ``.jpeg``/``.png``/``.webp``...) + ``KEY.cls`` (the label as text), and
optionally ``classes.txt`` (one class name a line, written by ``carp-fast make-shards``).
``ShardSource(folder)`` is an `EncodedSource` like an image folder: image i is the i-th image of
the shards taken in name order, and ``encoded(i)`` reads its bytes with one ``os.pread`` at the
offset the index gives.

Why read members by offset rather than with DALI's ``fn.readers.webdataset``: the reader
shards by whole tar files per rank and shuffles with a buffer, so its order is neither the
folder source's permutation of all N images from (seed, epoch) nor restartable at a given
batch, and it would give the torchvision path a second reader. An index turns the shards into
a random-access list, so everything the folder source has comes with it unchanged: the same
epoch order and per-rank slices (`sharding.py`), the same exact mid-epoch resume
(`EpochLoader.set_epoch(e, start_batch=b)`), the same DALI external-source and torchvision
paths (one ``encoded``), the same stand-in for an unreadable member. Shards made by
``make-shards`` from a folder hold that folder's usable images in its order, so both give the
same batches. The reads stay random (an epoch is a permutation of all images): what shards
gain over a folder is one open file per shard instead of one per image and no per-file
metadata on a shared file system, and a few large files that copy to local disk (or stay in
the page cache) well, where the random reads are cheap.

The index (per sample: shard, offset, size, label, member name) is built by walking each
tar's headers, once: it is kept in the scan cache (`scan_cache.py`, keyed by the folder's path
and each shard's size and modification time), built by rank 0 while the others wait. Members
are not checked by the pre-flight scan (``make-shards`` wrote only images that passed it); a
member that fails to decode is named as ``shard.tar:member`` in the error.
"""

from __future__ import annotations

import errno
import os
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from carp_fast.pipelines.scan import ScanResult
from carp_fast.pipelines.scan_cache import (built_by_main_process, cache_file, cache_folder, decode_strings,
                                            encode_strings, load_arrays, save_arrays)
from carp_fast.pipelines.sources import EncodedSource

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff")
CLASSES_FILE = "classes.txt"


def is_shard_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder holding ``*.tar`` files."""
    path = Path(path)
    return path.is_dir() and any(p.suffix == ".tar" and p.is_file() for p in path.iterdir())


def split_member(name: str) -> tuple[str, str]:
    """WebDataset's rule: the key is the member's path up to the first dot of its file name."""
    folder, _, base = name.rpartition("/")
    stem, _, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower()


def index_tar(path: str) -> dict[str, np.ndarray | list[str]]:
    """The samples of one tar in member order: image member names, data offsets and sizes, labels
    (-1 without a ``.cls`` member). Reads the headers and the ``.cls`` members only."""
    order: list[str] = []
    samples: dict[str, list] = {}
    with tarfile.open(path, "r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = split_member(member.name)
            sample = samples.get(key)
            if sample is None:
                sample = samples[key] = [None, -1, -1, -1]  # image name, offset, size, label
                order.append(key)
            if ext in IMAGE_EXTENSIONS and sample[0] is None:
                sample[:3] = member.name, member.offset_data, member.size
            elif ext == "cls":
                text = tar.extractfile(member).read().decode().strip()
                try:
                    sample[3] = int(text)
                except ValueError:
                    raise ValueError(f"{path}: {member.name} holds {text[:20]!r}, not an integer label") from None
    kept = [samples[k] for k in order if samples[k][0] is not None]  # a key without an image is no sample
    return {"names": [s[0] for s in kept], "offset": np.array([s[1] for s in kept], np.int64),
            "size": np.array([s[2] for s in kept], np.int64), "label": np.array([s[3] for s in kept], np.int64)}


_INDEX = {"tars", "stats", "shard", "offset", "size", "label", "members"}  # the arrays of a cached index


def _cached_index(tars: list[Path], key: str, folder: Path | None) -> dict | None:
    """The cached index of these tars (by name), or None (missing, malformed, other tars)."""
    cached = load_arrays(cache_file("shards", key, folder)) if folder is not None else None
    if cached is None or not _INDEX <= set(cached) or decode_strings(cached["tars"]) != [t.name for t in tars]:
        return None
    return cached


def _build_index(tars: list[Path], key: str, folder: Path | None) -> tuple[dict, bool]:
    """Index every tar (threads overlap the reads); reuse the cached index if no tar changed."""
    stats = np.array([(s.st_size, s.st_mtime_ns) for s in map(os.stat, tars)], np.int64).reshape(-1, 2)
    names = [t.name for t in tars]
    path = cache_file("shards", key, folder) if folder is not None else None
    cached = _cached_index(tars, key, folder)
    if cached is not None and np.array_equal(cached["stats"], stats):
        return cached, True
    with ThreadPoolExecutor(max_workers=8) as pool:
        parts = list(pool.map(lambda t: index_tar(str(t)), tars))
    index = dict(tars=encode_strings(names), stats=stats,
                 shard=np.concatenate([np.full(len(p["names"]), i, np.int64) for i, p in enumerate(parts)]),
                 offset=np.concatenate([p["offset"] for p in parts]), size=np.concatenate([p["size"] for p in parts]),
                 label=np.concatenate([p["label"] for p in parts]),
                 members=encode_strings([n for p in parts for n in p["names"]]))
    return index, (save_arrays(path, **index) if path is not None else False)


class ShardSource(EncodedSource):
    """Images of the tar shards in ``root`` (the WebDataset layout), in shard-name then member order.

    ``classes``: the lines of ``root/classes.txt`` when present (else ``class_<label>``); labels
    index them (``num_classes`` is their count, else ``max(label) + 1``).
    """

    def __init__(self, root: str | os.PathLike) -> None:
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"shard folder {str(root)!r} does not exist or is not a directory")
        tars = sorted(p for p in root.iterdir() if p.suffix == ".tar" and p.is_file())
        if not tars:
            raise ValueError(f"shard folder {str(root)!r} holds no .tar files (expected 000000.tar, ...)")
        key, folder = os.path.abspath(root), cache_folder()
        index = built_by_main_process(lambda: _build_index(tars, key, folder), lambda: _cached_index(tars, key, folder))
        labels = index["label"]
        if not len(labels):
            raise ValueError(f"shard folder {str(root)!r}: its {len(tars)} tar file(s) hold no image members "
                             f"(expected KEY.jpg + KEY.cls pairs; image extensions {IMAGE_EXTENSIONS})")
        classes_file = root / CLASSES_FILE
        if classes_file.is_file():
            self.classes = [ln for ln in classes_file.read_text().splitlines() if ln.strip()]
        else:
            self.classes = [f"class_{c}" for c in range(int(labels.max()) + 1)] if (labels >= 0).any() else []
        self.root = root
        self._setup([str(t) for t in tars], index["shard"], index["offset"], index["size"], labels,
                    decode_strings(index["members"]), len(self.classes), str(root))

    def _setup(self, tars: list[str], shard, offset, size, labels, members: list[str], num_classes: int,
               where: str) -> None:
        self._tars, self._shard, self._offset, self._size = tars, shard, offset, size
        self._members = members
        self._fds: dict[int, int] = {}  # shard -> open descriptor (pread: no shared offset, fork-safe)
        names = [f"{tars[s]}:{m}" for s, m in zip(shard, members)]
        n = len(names)
        everything = ScanResult(keep=np.ones(n, bool), convert=np.zeros(n, bool), bad=[])
        super().__init__(names, labels, num_classes, where, scan=everything)

    def _read(self, i: int) -> np.ndarray:
        shard, offset, size = int(self._shard[i]), int(self._offset[i]), int(self._size[i])
        fd = self._fds.get(shard)
        if fd is None:  # first read of this shard; reading threads may race here: one descriptor wins
            opened = os.open(self._tars[shard], os.O_RDONLY)
            fd = self._fds.setdefault(shard, opened)
            if fd != opened:
                os.close(opened)
        data = os.pread(fd, size, offset)
        if len(data) != size:
            raise OSError(errno.EIO, f"{self._tars[shard]} ends {size - len(data)} bytes early "
                                     "(truncated since it was indexed)")
        return np.frombuffer(data, np.uint8)

    def subset(self, n: int, seed: int = 0) -> "ShardSource":
        """A fixed random subset of ``n`` images (as `EncodedSource.subset`); the source itself when
        ``n`` is not smaller than it."""
        if n >= len(self._candidates):
            return self
        from carp_fast.pipelines.sources import _subset_indices

        idx = _subset_indices(len(self._candidates), n, seed)
        sub = ShardSource.__new__(ShardSource)
        sub.root, sub.classes = self.root, list(self.classes)
        sub._setup(self._tars, self._shard[idx], self._offset[idx], self._size[idx], self._candidate_labels[idx],
                   [self._members[i] for i in idx], self.num_classes, f"{self.where} (a subset of {len(idx)})")
        return sub

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state["_fds"] = {}  # descriptors do not cross a spawn; each process opens its own
        return state

    def __del__(self) -> None:
        for fd in getattr(self, "_fds", {}).values():
            try:
                os.close(fd)
            except OSError:
                pass
