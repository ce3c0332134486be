"""Input-pipeline throughput: DALI vs torchvision multi-crop loading, side by side.

    python -m carp_fast.pipelines.make_jpeg_folder .bench/jpegs --classes 2 --per-class 300
    python -m carp_fast.pipelines.bench --data .bench/jpegs --backend both --batch-size 32 --workers 2 --seconds 30
    carp-fast bench-data --data .bench/jpegs --backend dali ...

Each backend runs alone for `--seconds` after `--warmup` batches (pipeline build, first
prefetch, page cache); epochs roll over inside the timed window, so per-epoch start-up
(a DALI pipeline or torch workers per epoch) is counted. The last line printed is one
JSON object: `backend`, `images_per_s`, `crops_per_s` of the first backend run, `scan_s` (listing
and checking the files, or indexing the shards; through the scan cache, so a second run shows what
a later launch pays), `startup_s` (from opening the data to the first backend's first batch), and,
with `--backend both`, every result and the speed-up of DALI over torchvision. `--data` is a
folder of class sub-folders or of tar shards (`carp-fast make-shards`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from rich.console import Console
from rich.table import Table

from carp_fast.pipelines.augment import MultiCropConfig
from carp_fast.pipelines.loaders import pretrain_loader
from carp_fast.pipelines.sources import as_source


def measure(source, crops: MultiCropConfig, backend: str, batch_size: int, workers: int, seconds: float,
            warmup: int, device=None) -> dict:
    """Images and crops per second of one backend; batches are consumed, not kept.
    ``first_batch_s``: from the call (building the loader) to its first batch."""
    called = time.perf_counter()
    loader = pretrain_loader(source, crops, batch_size=batch_size, backend=backend, workers=workers, device=device)
    done, images, start, first = 0, 0, None, None
    while start is None or time.perf_counter() - start < seconds:
        for batch in loader:
            done += 1
            if first is None:
                first = time.perf_counter() - called
            if done == warmup:
                start = time.perf_counter()
            elif done > warmup:
                images += batch[-1].shape[0]
            if start is not None and time.perf_counter() - start >= seconds:
                break
    if batch[0].is_cuda:
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"backend": backend, "images_per_s": round(images / elapsed, 1),
            "crops_per_s": round(images * crops.num_crops / elapsed, 1), "images": images,
            "seconds": round(elapsed, 2), "batch_size": batch_size, "workers": workers,
            "first_batch_s": round(first, 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="carp-fast bench-data", description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="a folder of class sub-folders (see make_jpeg_folder) or of tar shards")
    parser.add_argument("--backend", default="both", choices=["dali", "torchvision", "both"],
                        help="'both' runs DALI then torchvision in one process, for a fair comparison")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2, help="DALI threads / torch DataLoader worker processes")
    parser.add_argument("--seconds", type=float, default=30.0, help="timed window per backend")
    parser.add_argument("--warmup", type=int, default=3, help="batches run before the clock starts")
    parser.add_argument("--global-crops", type=int, default=2)
    parser.add_argument("--global-size", type=int, default=224)
    parser.add_argument("--local-crops", type=int, default=6)
    parser.add_argument("--local-size", type=int, default=96)
    parser.add_argument("--device", default=None, help="default: the current CUDA device if any, else cpu")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.warmup < 1:
        parser.error("--seconds must be > 0 and --warmup >= 1")

    console = Console(stderr=False)
    crops = MultiCropConfig(global_crops=args.global_crops, global_size=args.global_size,
                            local_crops=args.local_crops, local_size=args.local_size)
    opened = time.perf_counter()
    source = as_source(args.data).check()
    scan_s = time.perf_counter() - opened
    backends = ["dali", "torchvision"] if args.backend == "both" else [args.backend]
    console.print(f"[bold]bench-data[/] {len(source)} images in {args.data}, "
                  f"{args.global_crops}x{args.global_size} + {args.local_crops}x{args.local_size} crops, "
                  f"batch {args.batch_size}, workers {args.workers}, {os.cpu_count()} CPUs, "
                  f"{'CUDA ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU'}")
    results = []
    for backend in backends:
        with console.status(f"measuring {backend} for {args.seconds:g} s"):
            results.append(measure(source, crops, backend, args.batch_size, args.workers, args.seconds,
                                   args.warmup, args.device))
    table = Table("backend", "images/s", "crops/s", "images timed", "seconds")
    for r in results:
        table.add_row(r["backend"], f"{r['images_per_s']:.1f}", f"{r['crops_per_s']:.1f}", str(r["images"]),
                      f"{r['seconds']:.1f}")
    console.print(table)
    summary = dict(results[0])
    summary.update(crops=f"{args.global_crops}x{args.global_size}+{args.local_crops}x{args.local_size}",
                   data=str(args.data), num_images=len(source), cpus=os.cpu_count(), scan_s=round(scan_s, 3),
                   startup_s=round(scan_s + results[0]["first_batch_s"], 3),
                   gpu=torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                   python=platform.python_version())
    if len(results) == 2:
        summary["results"] = results
        summary["dali_speedup"] = round(results[0]["images_per_s"] / results[1]["images_per_s"], 2)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
