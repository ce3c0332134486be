"""The pre-flight scan done once: its results kept on disk, built by rank 0, reused by every rank.

Scanning every file's header and tail costs about 50 microseconds a file warm (over a minute
for ImageNet's 1.33M files per process, several cold or on a network file system), and every
process of every launch and resume paid it. Here:

- **What is kept**: for each file, its size and modification time (ns) and the scan's verdict
  (native / convert / bad, with the reason), in one file per data folder,
  ``<cache>/scan/<sha1 of the folder's absolute path>.npz`` (plain arrays, read with
  ``allow_pickle=False``). A later launch stats the files (no open, no read) and checks again
  only those whose size or modification time changed, or that are new: a changed file is
  rebuilt, the rest reused.
- **Where**: ``$CARP_FAST_CACHE`` if set (``off`` or ``0`` turns the cache off), else
  ``$XDG_CACHE_HOME/carp_fast``, else ``~/.cache/carp_fast``: outside the data, so read-only
  data sets work. On several nodes, point ``CARP_FAST_CACHE`` at a shared folder, or each
  node's first process builds its own copy.
- **Who builds it**: with ``torch.distributed`` initialised, rank 0 scans (or validates) and
  writes while the others wait in a broadcast (`carp_fast.distributed.main_process_value`:
  every process must open the same sources in the same order, as for any collective; the wait
  is bounded by the process group's timeout, 30 minutes under Accelerate). The others then
  take the verdicts from the file rank 0 has just written, without a stat, and scan themselves
  only what is not in it (a node-local cache folder, a write that failed).

A cache that cannot be written (a read-only home) warns once and the scan result is used as is.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, TypeVar

import numpy as np

from carp_fast.pipelines import scan
from carp_fast.pipelines.scan import ScanResult

T = TypeVar("T")
KINDS = ("native", "convert", "bad")  # stored as their index, int8
_warned_unwritable: set[str] = set()


def cache_folder() -> Path | None:
    """The cache folder, or None when ``CARP_FAST_CACHE`` is ``off``, ``0`` or ``none``."""
    value = os.environ.get("CARP_FAST_CACHE")
    if value is not None:
        return None if value.strip().lower() in ("", "0", "off", "none", "false") else Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "carp_fast"


def cache_file(kind: str, key: str, folder: Path) -> Path:
    """``folder/kind/<sha1(key)>.npz``: one file per data path."""
    return folder / kind / (hashlib.sha1(key.encode()).hexdigest() + ".npz")


def save_arrays(path: Path, **arrays: np.ndarray) -> bool:
    """Write ``arrays`` to ``path`` atomically (a temporary file, then a rename); False (with
    one warning per folder) when the folder cannot be written."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        return True
    except OSError as error:
        if str(path.parent) not in _warned_unwritable:
            _warned_unwritable.add(str(path.parent))
            warnings.warn(f"scan cache {path.parent} is not writable ({error.strerror}): the scan is not kept; "
                          "set CARP_FAST_CACHE to a writable folder, or to 'off'", stacklevel=3)
        return False


def load_arrays(path: Path) -> dict[str, np.ndarray] | None:
    """The arrays of ``path``, or None when it is missing or unreadable (then it is rebuilt)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in data.files}
    except (OSError, ValueError, KeyError):  # missing, truncated, not an npz
        return None


def encode_strings(strings: list[str]) -> np.ndarray:
    """Strings as one uint8 array, newline-separated (paths hold no newline)."""
    return np.frombuffer("\n".join(strings).encode("utf-8", "surrogateescape"), np.uint8)


def decode_strings(data: np.ndarray) -> list[str]:
    return data.tobytes().decode("utf-8", "surrogateescape").split("\n") if data.size else []


def built_by_main_process(build: Callable[[], tuple[T, bool]], reuse: Callable[[], T | None]) -> T:
    """``build()`` on rank 0 while the others wait; then ``reuse()`` on the others.

    ``build`` returns (result, whether it was written to the cache); ``reuse`` reads what rank 0
    wrote, or gives None (then that process builds for itself). One process: ``build()``. An
    error in rank 0's ``build`` is raised there and, as a `RuntimeError` naming it, on the others
    (rather than leaving them waiting).
    """
    from carp_fast.distributed import main_process, main_process_value, world_size

    if world_size() == 1:
        return build()[0]
    result, outcome = None, 0  # 0: built, not written; 1: written to the cache; 2: failed
    if main_process():
        try:
            result, written = build()
            outcome = int(written)
        except BaseException:
            main_process_value(2)  # release the others before raising
            raise
    outcome = main_process_value(outcome)  # the others wait here while rank 0 builds
    if main_process():
        return result
    if outcome == 2:
        raise RuntimeError("the main process (rank 0) failed while scanning or indexing the data: see its error")
    reused = reuse() if outcome == 1 else None
    return reused if reused is not None else build()[0]


def stat_files(paths: list[str], threads: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Size and modification time (ns) of every file, `[N]` int64 each (-1 for a file that
    cannot be stat'ed: it is then scanned, which reports it)."""
    def chunk(part: list[str]) -> list[tuple[int, int]]:
        out = []
        for p in part:
            try:
                s = os.stat(p)
                out.append((s.st_size, s.st_mtime_ns))
            except OSError:
                out.append((-1, -1))
        return out

    step = 4096  # a task per chunk, not per file: the pool's own cost is about that of a stat
    with ThreadPoolExecutor(max_workers=threads) as pool:
        parts = list(pool.map(chunk, [paths[i: i + step] for i in range(0, len(paths), step)]))
    pairs = np.array([pair for part in parts for pair in part], dtype=np.int64).reshape(-1, 2)
    return pairs[:, 0].copy(), pairs[:, 1].copy()


def _scan_entries(path: Path) -> dict[str, np.ndarray] | None:
    """A cached scan, or None when it is missing or malformed (another version's, a torn copy)."""
    entries = load_arrays(path)
    if entries is None or not {"names", "size", "mtime", "kind", "reasons"} <= set(entries):
        return None
    n = len(decode_strings(entries["names"]))
    return entries if len(entries["size"]) == len(entries["mtime"]) == len(entries["kind"]) == n else None


def _relative(paths: list[str], root: str) -> list[str]:
    prefix = root.rstrip(os.sep) + os.sep
    return [p[len(prefix):] if p.startswith(prefix) else p for p in (os.path.abspath(p) for p in paths)]


def _verdicts(entries: dict[str, np.ndarray], names: list[str], size=None, mtime=None):
    """Per name: the index of its cached entry (or -1), and whether it still applies."""
    known = {n: i for i, n in enumerate(decode_strings(entries["names"]))}
    index = np.array([known.get(n, -1) for n in names], dtype=np.int64)
    valid = index >= 0
    if size is not None:
        safe = np.where(valid, index, 0)
        valid &= (entries["size"][safe] == size) & (entries["mtime"][safe] == mtime) & (size >= 0)
    return index, valid


def _result(kind: np.ndarray, names: list[str], paths: list[str], reasons: dict[str, str]) -> ScanResult:
    bad = [(p, reasons.get(n, "unusable")) for p, n, k in zip(paths, names, kind) if k == 2]
    return ScanResult(keep=kind != 2, convert=kind == 1, bad=bad)


def _scan_through_cache(paths: list[str], root: str, folder: Path) -> tuple[ScanResult, bool]:
    """Scan what changed since the cached scan of ``root``, reuse the rest, write it back."""
    path = cache_file("scan", root, folder)
    names = _relative(paths, root)
    size, mtime = stat_files(paths)
    entries = _scan_entries(path)
    kind = np.full(len(paths), -1, np.int8)
    reasons: dict[str, str] = {}
    if entries is not None:
        index, valid = _verdicts(entries, names, size, mtime)
        kind[valid] = entries["kind"][index[valid]]
        reasons = json.loads(entries["reasons"].tobytes() or b"{}")
    todo = np.flatnonzero(kind < 0)
    if len(todo) == 0:
        return _result(kind, names, paths, reasons), True
    fresh = scan.scan_files([paths[i] for i in todo])  # module attribute: tests may watch check_file
    kind[todo] = np.where(fresh.keep, np.where(fresh.convert, 1, 0), 2)
    fresh_reasons = dict(fresh.bad)
    for i in todo:
        reasons.pop(names[i], None)
        if paths[i] in fresh_reasons:
            reasons[names[i]] = fresh_reasons[paths[i]]
    # Keep the entries of files not asked for this time (a subset now, the whole folder later).
    keep_old: list[int] = []
    old_names: list[str] = []
    if entries is not None:
        asked, old_names = set(names), decode_strings(entries["names"])
        keep_old = [i for i, n in enumerate(old_names) if n not in asked]
    all_names = names + [old_names[i] for i in keep_old]
    take = np.array(keep_old, dtype=np.int64)
    written = save_arrays(
        path, names=encode_strings(all_names),
        size=np.concatenate([size, entries["size"][take]]) if keep_old else size,
        mtime=np.concatenate([mtime, entries["mtime"][take]]) if keep_old else mtime,
        kind=np.concatenate([kind, entries["kind"][take]]) if keep_old else kind,
        reasons=np.frombuffer(json.dumps({n: r for n, r in reasons.items()}).encode(), np.uint8))
    return _result(kind, names, paths, reasons), written


def _reuse(paths: list[str], root: str, folder: Path) -> ScanResult | None:
    """The verdicts rank 0 has just written, trusted without a stat; None if any is missing."""
    entries = _scan_entries(cache_file("scan", root, folder))
    if entries is None:
        return None
    names = _relative(paths, root)
    index, valid = _verdicts(entries, names)
    if not valid.all():
        return None
    reasons = json.loads(entries["reasons"].tobytes() or b"{}")
    return _result(entries["kind"][index], names, paths, reasons)


def cached_scan(paths: list[str], root: str | os.PathLike) -> ScanResult:
    """`scan.scan_files(paths)` through the cache of ``root`` (the data's folder), built once by
    rank 0 (see the module's docstring); the plain scan when the cache is off."""
    folder = cache_folder()
    if folder is None:
        return scan.scan_files(paths)
    root = os.path.abspath(root)
    return built_by_main_process(lambda: _scan_through_cache(paths, root, folder),
                                 lambda: _reuse(paths, root, folder))
