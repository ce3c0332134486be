"""Convert an ImageNet-layout folder into tar shards (the WebDataset layout).

    carp-fast make-shards /data/imagenet /data/imagenet-shards --shard-size 2000

``SRC/train/<class>/*`` and ``SRC/val/<class>/*`` (or ``test/``; or class folders directly
under SRC, the training split) become ``DST/train/000000.tar ...`` and ``DST/val/...``. Each
split's images are those the pre-flight scan keeps, in the folder source's order, so
`ShardSource(DST/train)` gives the same images, labels and epoch orders as
`ImageFolderSource(SRC/train)`:

- member ``NNNNNNNN_<file stem>.jpg`` (or ``.png``): the file's own bytes, or, for images the
  scan flags for conversion (CMYK, alpha, 16-bit...), the same RGB PNG the folder source
  decodes; member ``....cls``: the label, the class's index;
- ``classes.txt``: the class names, one a line, in label order (empty classes included);
- ``bad_files.txt``: the files the scan left out, ``path<TAB>reason``;
- ``make_shards.json``: what was converted (source, shard size, images, a digest of the list).

Resumable: each shard is written to a temporary name and renamed when complete, and a run
skips the shards already there; a second run over a source that has changed since (another
list of images or another shard size) stops with an error rather than mixing the two.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tarfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from carp_fast.pipelines.shards import CLASSES_FILE
from carp_fast.pipelines.sources import ImageFolderSource

SPLITS = (("train",), ("val", "test"))  # source sub-folders tried per split, in order
PLAN_FILE = "make_shards.json"
BAD_FILE = "bad_files.txt"
_READ_AHEAD = 64  # images read ahead by the pool while the tar is written


def _member_name(index: int, path: str, data: bytes) -> str:
    """``NNNNNNNN_<stem>.<ext>``: unique by index, no dot in the key (WebDataset splits there)."""
    ext = "png" if data[:4] == b"\x89PNG" else "jpg"  # the scan lets through JPEG and PNG only
    return f"{index:08d}_{Path(path).stem.replace('.', '_')}.{ext}"


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # no clock: the same input gives the same bytes
    tar.addfile(info, io.BytesIO(data))


def _write_shard(path: Path, source: ImageFolderSource, indices: range, pool: ThreadPoolExecutor) -> None:
    """Write images ``indices`` of ``source`` to ``path``, atomically (temporary name, then rename).
    The pool's threads read (and convert) the next images while this thread writes."""
    tmp = path.with_name(f".{path.name}.tmp")
    read = lambda i: source.encoded(i).tobytes()  # noqa: E731
    with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
        for start in range(indices.start, indices.stop, _READ_AHEAD):  # a bounded window in memory
            chunk = range(start, min(start + _READ_AHEAD, indices.stop))
            for i, data in zip(chunk, pool.map(read, chunk)):
                key = _member_name(i, source.files[i], data)
                _add(tar, key, data)
                _add(tar, key.rsplit(".", 1)[0] + ".cls", str(int(source.labels[i])).encode())
    os.replace(tmp, path)


def _plan(source: ImageFolderSource, shard_size: int, src: Path) -> dict:
    digest = hashlib.sha1()
    for path, label in zip(source.files, source.labels):
        digest.update(f"{os.path.relpath(path, src)}\t{label}\n".encode())
    return {"source": os.path.abspath(src), "shard_size": shard_size, "images": len(source.files),
            "shards": -(-len(source.files) // shard_size), "classes": len(source.classes), "digest": digest.hexdigest()}


def convert_split(src: Path, dst: Path, shard_size: int, progress=None) -> dict:
    """Shard one split folder ``src`` (class sub-folders) into ``dst``; returns its plan plus
    ``written``, ``skipped`` (shards already there) and ``bad`` (the files left out)."""
    if shard_size < 1:
        raise ValueError(f"shard_size must be >= 1 image, got {shard_size}")
    source = ImageFolderSource(src)
    scanning = progress.add_task(f"scanning {src} (once: kept in the scan cache)", total=None) if progress else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the bad files are listed in bad_files.txt and the summary instead
        source.check()
    if progress is not None:
        progress.remove_task(scanning)
    plan = _plan(source, shard_size, src)
    dst.mkdir(parents=True, exist_ok=True)
    plan_path = dst / PLAN_FILE
    if plan_path.is_file():
        before = json.loads(plan_path.read_text())
        if before != plan:
            raise ValueError(
                f"{dst} holds shards of another conversion ({before.get('images')} images of {before.get('source')}, "
                f"shard size {before.get('shard_size')}; now {plan['images']} images of {plan['source']}, shard size "
                f"{shard_size}): give an empty DST, or delete {dst} to convert again")
    else:
        plan_path.write_text(json.dumps(plan, indent=1) + "\n")
    (dst / CLASSES_FILE).write_text("".join(f"{c}\n" for c in source.classes))
    bad = source.bad_files
    (dst / BAD_FILE).write_text("".join(f"{p}\t{why}\n" for p, why in bad))
    task = progress.add_task(f"{src.name} -> {dst}", total=len(source)) if progress is not None else None
    written = skipped = 0
    with ThreadPoolExecutor(max_workers=8) as pool:
        for k, start in enumerate(range(0, len(source), shard_size)):
            indices = range(start, min(start + shard_size, len(source)))
            path = dst / f"{k:06d}.tar"
            if path.is_file():
                skipped += 1
            else:
                _write_shard(path, source, indices, pool)
                written += 1
            if progress is not None:
                progress.advance(task, len(indices))
    return {**plan, "written": written, "skipped": skipped, "bad": bad}


def make_shards(src: str | os.PathLike, dst: str | os.PathLike, shard_size: int = 2000,
                progress=None) -> dict[str, dict]:
    """Convert every split of ``src`` (see the module's docstring); returns each split's summary.

    ``progress``: a `rich.progress.Progress` to report on (None: quiet).
    """
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise FileNotFoundError(f"source {str(src)!r} does not exist or is not a directory")
    if dst.resolve() == src.resolve() or src.resolve() in dst.resolve().parents:
        raise ValueError(f"DST {str(dst)!r} must be outside SRC {str(src)!r} (it would be scanned as images)")
    summary = {}
    for names in SPLITS:
        found = next((n for n in names if (src / n).is_dir()), None)
        if found is not None:
            summary[found] = convert_split(src / found, dst / found, shard_size, progress)
    if not summary:  # class folders directly under SRC: the training split
        summary["train"] = convert_split(src, dst / "train", shard_size, progress)
    return summary


def main(argv: list[str] | None = None) -> None:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    parser = argparse.ArgumentParser(prog="carp-fast make-shards", description=__doc__.splitlines()[0])
    parser.add_argument("src", help="ImageNet-layout folder: SRC/train/<class>/*, SRC/val/<class>/*")
    parser.add_argument("dst", help="where DST/train/*.tar and DST/val/*.tar go (created; a stopped run resumes)")
    parser.add_argument("--shard-size", type=int, default=2000,
                        help="images per shard (2000 ImageNet JPEGs: about 220 MB; 100 MB to 1 GB shards copy and "
                             "cache well)")
    args = parser.parse_args(argv)
    if args.shard_size < 1:
        parser.error(f"--shard-size must be >= 1, got {args.shard_size}")
    console = Console(soft_wrap=True, highlight=False)  # whole lines: paths stay greppable
    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    try:
        with Progress(*columns, console=console) as progress:
            summary = make_shards(args.src, args.dst, args.shard_size, progress)
    except (FileNotFoundError, ValueError) as error:
        parser.exit(2, f"carp-fast make-shards: error: {error}\n")
    for split, s in summary.items():
        console.print(f"{split}: {s['images']} images of {s['classes']} classes in {s['shards']} shards "
                      f"({s['written']} written, {s['skipped']} already there) in {Path(args.dst) / split}",
                      markup=False)
        if s["bad"]:
            named = "; ".join(f"{p} ({why})" for p, why in s["bad"][:5])
            more = f" and {len(s['bad']) - 5} more" if len(s["bad"]) > 5 else ""
            console.print(f"  left out {len(s['bad'])} unusable file(s): {named}{more} "
                          f"(all in {Path(args.dst) / split / BAD_FILE})", markup=False)


if __name__ == "__main__":
    main()
