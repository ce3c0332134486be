"""Issue 22's data-at-scale targets, measured in one run: the scan done once, the converter's
MB/s, shards against their folder on the CPU DALI pipeline, and a cold page cache.

    .venv/bin/python benchmarks/data_at_scale.py                       # full size, about 8 minutes on 2 cores
    .venv/bin/python benchmarks/data_at_scale.py --no-cold             # without dropping the page cache

Everything is generated under a fresh folder in ``--tmp`` (default /tmp) and deleted at the end
(``--keep`` keeps it). Four measurements:

1. **Scan once** (``--scan-files`` small JPEGs of 32-64 px in 100 class folders: the scan's cost
   is per file). Each launch is a fresh Python process timing ``as_source(folder).check()``,
   which is ``scan_s`` of ``carp-fast bench-data`` (listing the class folders + the pre-flight
   scan through the scan cache), with ``CARP_FAST_CACHE`` on one folder under the work folder:
   the first launch (empty cache), the second, the third after one file was rewritten, and one
   with ``CARP_FAST_CACHE=off`` (what every launch paid before issue 22). ``checked``: how many
   files the scan opened (``scan.check_file`` calls). With ``--cold``, the first and second
   launches again, each after dropping the page cache (``echo 3 > /proc/sys/vm/drop_caches``),
   with a new cache folder. Then one real ``carp-fast bench-data`` launch on the warm cache,
   for its own ``scan_s`` and ``startup_s``.
2. **Converter** (``--images`` ImageNet-sized JPEGs from ``make_jpeg_folder``, about 100 KB at
   400 x 350 px, in ``--classes`` class folders of SRC/train): ``make_shards(SRC, DST,
   --shard-size)`` (what ``carp-fast make-shards`` runs, without its progress bar) in a fresh
   process with an empty scan cache (the scan is included), timed inside the process (imports
   excluded), then ``os.sync()`` (the whole machine's dirty pages) timed after it. MB/s: the
   source's bytes over that time. Reference on the same bytes: GNU ``tar -cf`` of SRC/train
   (one process reading the files and writing one archive), also timed then synced.
3. **Shards against their folder**: the CPU DALI multi-crop pipeline (2 x 224 + 6 x 96 by
   default, as bench-data) fed from SRC/train and from DST/train (the same images in the same
   epoch order: checked), alternating folder / shards ``--rounds`` times in this process, each
   ``--seconds`` after ``--warmup`` batches (the loop of `carp_fast.pipelines.bench.measure`).
   Ratio: median shards images/s over median folder images/s. ``feed_wait``: the share of the
   timed window the training thread spent inside DALI's external-source callback (which waits
   for the reading threads of `dali_loader._feed`): the part of data wait due to reading files;
   the rest of a loader-only run is decoding and cropping on DALI's threads. Also "read only":
   every image of one epoch order read through 8 threads (`dali_loader.READ_THREADS`), no
   decoding: the reading ceiling.
4. **Cold page cache** (``--cold``, needs root): the converter, tar, the read-only pass and one
   pipeline run each for folder and shards, each after dropping the page cache.

Prints a table, then one JSON line with every number.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DROP_CACHES = "/proc/sys/vm/drop_caches"

# One launch: list + scan a folder (bench-data's scan_s) or index a shard folder, counting the files checked.
_LAUNCH = r"""
import json, sys, time
t0 = time.perf_counter()
from carp_fast.pipelines import scan, shards
from carp_fast.pipelines.sources import as_source
checked, indexed = [0], [0]
real_check, real_index = scan.check_file, shards.index_tar
def check_file(path):
    checked[0] += 1
    return real_check(path)
def index_tar(path):
    indexed[0] += 1
    return real_index(path)
scan.check_file, shards.index_tar = check_file, index_tar
t1 = time.perf_counter()
source = as_source(sys.argv[1])
t2 = time.perf_counter()
source.check()
t3 = time.perf_counter()
print(json.dumps({"import_s": t1 - t0, "list_s": t2 - t1, "check_s": t3 - t2, "scan_s": t3 - t1,
                  "images": len(source), "checked": checked[0], "tars_indexed": indexed[0]}))
"""

# The converter in a fresh process, timed without its imports; then a machine-wide sync.
_CONVERT = r"""
import json, os, sys, time
from carp_fast.pipelines.make_shards import make_shards
t0 = time.perf_counter()
summary = make_shards(sys.argv[1], sys.argv[2], int(sys.argv[3]))
t1 = time.perf_counter()
os.sync()
t2 = time.perf_counter()
s = summary["train"]
print(json.dumps({"convert_s": t1 - t0, "sync_s": t2 - t1, "images": s["images"], "shards": s["shards"],
                  "bad": len(s["bad"])}))
"""


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def drop_caches() -> bool:
    """Write back dirty pages, then drop the page cache, dentries and inodes; False if not allowed."""
    os.sync()
    try:
        with open(DROP_CACHES, "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def folder_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------------------- data
def make_small_folder(root: Path, n: int, classes: int = 100, seed: int = 0) -> None:
    """``n`` small JPEGs (32 to 64 px, random pixels, about 4 KB) in ``classes`` class folders."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    classes = max(1, min(classes, n))
    for c in range(classes):
        (root / f"c{c:03d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        side = int(rng.integers(32, 65))
        pixels = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / f"c{i % classes:03d}" / f"img_{i:06d}.jpg", quality=90)


def _make_class(args: tuple[str, int, int]) -> None:
    from carp_fast.pipelines.make_jpeg_folder import make_jpeg_folder

    out, c, per_class = args
    tmp = Path(out).parent / f".gen_{c}"
    make_jpeg_folder(tmp, classes=1, per_class=per_class, seed=1000 + c)
    os.replace(tmp / "class_000", Path(out) / f"class_{c:03d}")
    shutil.rmtree(tmp)


def make_imagenet_like(root: Path, images: int, classes: int) -> None:
    """``images`` ImageNet-sized JPEGs (make_jpeg_folder: ~100 KB, 400 x 350) in SRC/train, 2 processes."""
    root.mkdir(parents=True, exist_ok=True)
    per_class = max(1, images // classes)
    with multiprocessing.get_context("fork").Pool(min(2, os.cpu_count() or 1)) as pool:
        pool.map(_make_class, [(str(root), c, per_class) for c in range(classes)])


# ------------------------------------------------------------------------------------ launches
def run_json(cmd: list[str], env: dict) -> dict:
    """Run ``cmd``; its last stdout line is JSON. Adds ``wall_s`` (the whole process)."""
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed ({done.returncode}):\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["wall_s"] = wall
    return result


def launch(path: Path, cache: str) -> dict:
    env = dict(os.environ, CARP_FAST_CACHE=cache)
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in
            run_json([sys.executable, "-c", _LAUNCH, str(path)], env).items()}


def carp_fast_command() -> list[str]:
    exe = Path(sys.executable).parent / "carp-fast"
    return [str(exe)] if exe.is_file() else [sys.executable, "-m", "carp_fast.cli"]


def timed_command(cmd: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - started


def convert(src: Path, dst: Path, shard_size: int, cache: Path, nbytes: int) -> dict:
    env = dict(os.environ, CARP_FAST_CACHE=str(cache))
    r = run_json([sys.executable, "-c", _CONVERT, str(src), str(dst), str(shard_size)], env)
    mb = nbytes / 1e6
    return {"images": r["images"], "shards": r["shards"], "bad": r["bad"], "mb": round(mb, 1),
            "out_mb": round(folder_bytes(dst) / 1e6, 1), "convert_s": round(r["convert_s"], 2),
            "sync_s": round(r["sync_s"], 2), "mb_per_s": round(mb / r["convert_s"], 1),
            "mb_per_s_synced": round(mb / (r["convert_s"] + r["sync_s"]), 1)}


def tar_reference(src: Path, out: Path, nbytes: int) -> dict:
    tar_s = timed_command(["tar", "-cf", str(out), "-C", str(src.parent), src.name])
    started = time.perf_counter()
    os.sync()
    sync_s = time.perf_counter() - started
    out.unlink()
    mb = nbytes / 1e6
    return {"tar_s": round(tar_s, 2), "sync_s": round(sync_s, 2), "mb_per_s": round(mb / tar_s, 1),
            "mb_per_s_synced": round(mb / (tar_s + sync_s), 1)}


# ---------------------------------------------------------------------------------- throughput
class FeedClock:
    """Seconds the training thread spends inside DALI's external-source callback (`_feed`)."""

    waited = 0.0

    @classmethod
    def install(cls) -> None:
        from carp_fast.pipelines import dali_loader

        real = dali_loader._feed
        if getattr(real, "_timed", False):
            return

        def timed_feed(*args, **kwargs):
            inner = real(*args, **kwargs)
            try:
                while True:
                    started = time.perf_counter()
                    try:
                        item = next(inner)
                    except StopIteration:
                        return
                    finally:
                        cls.waited += time.perf_counter() - started
                    yield item
            finally:
                inner.close()  # an abandoned epoch: the real feed cancels its queued reads

        timed_feed._timed = True
        dali_loader._feed = timed_feed


def pipeline_run(source, crops, batch_size: int, workers: int, seconds: float, warmup: int) -> dict:
    """`carp_fast.pipelines.bench.measure`'s loop (DALI, CPU), with the feed's wait in the timed window."""
    from carp_fast.pipelines.loaders import pretrain_loader

    called = time.perf_counter()
    loader = pretrain_loader(source, crops, batch_size=batch_size, backend="dali", workers=workers, device=None)
    done, images, start, first, waited0 = 0, 0, None, None, 0.0
    while start is None or time.perf_counter() - start < seconds:
        for batch in loader:
            done += 1
            if first is None:
                first = time.perf_counter() - called
            if done == warmup:
                start, waited0 = time.perf_counter(), FeedClock.waited
            elif done > warmup:
                images += batch[-1].shape[0]
            if start is not None and time.perf_counter() - start >= seconds:
                break
    elapsed = time.perf_counter() - start
    waited = FeedClock.waited - waited0
    del loader
    return {"images_per_s": round(images / elapsed, 1), "images": images, "seconds": round(elapsed, 2),
            "feed_wait": round(waited / elapsed, 4), "first_batch_s": round(first, 2)}


def read_only(source, threads: int) -> dict:
    """Every image of one epoch order (a permutation, seed 0) read through ``threads`` threads."""
    order = np.random.default_rng(0).permutation(len(source))
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        nbytes = sum(len(b) for b in pool.map(lambda i: source.encoded(int(i)), order))
    elapsed = time.perf_counter() - started
    return {"images_per_s": round(len(order) / elapsed, 1), "mb_per_s": round(nbytes / 1e6 / elapsed, 1),
            "seconds": round(elapsed, 2)}


# ------------------------------------------------------------------------------------------ main
def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    result: dict = {"date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cpus": os.cpu_count(),
                    "machine": platform.processor() or platform.machine(), "python": platform.python_version(),
                    "load_start": load(), "args": {k: v for k, v in vars(args).items()}}
    work = Path(tempfile.mkdtemp(prefix="carp_data_at_scale_", dir=args.tmp))
    cold = args.cold
    try:
        # ---- 1. scan once
        small = work / "small"
        log(f"making {args.scan_files} small JPEGs in {small}")
        started = time.perf_counter()
        make_small_folder(small, args.scan_files)
        result["small_folder"] = {"files": args.scan_files, "mb": round(folder_bytes(small) / 1e6, 1),
                                  "make_s": round(time.perf_counter() - started, 1)}
        cache = str(work / "cache")
        scan: dict = {"load": load()}
        log("scan: first launch (empty cache)")
        scan["first"] = launch(small, cache)
        log("scan: second launch")
        scan["second"] = launch(small, cache)
        changed = sorted((small / "c000").iterdir())[0]
        from PIL import Image

        Image.new("RGB", (40, 40), (200, 10, 10)).save(changed, format="JPEG", quality=90)  # new bytes, new mtime
        log(f"scan: third launch after rewriting {changed.name}")
        scan["after_one_change"] = launch(small, cache)
        log("scan: a launch with CARP_FAST_CACHE=off (before issue 22)")
        scan["cache_off"] = launch(small, "off")
        scan["cache_mb"] = round(sum(p.stat().st_size for p in Path(cache).rglob("*.npz")) / 1e6, 2)
        scan["second_over_first"] = round(scan["second"]["scan_s"] / scan["first"]["scan_s"], 4)
        scan["after_change_over_first"] = round(scan["after_one_change"]["scan_s"] / scan["first"]["scan_s"], 4)
        if cold:
            cold_cache = str(work / "cache_cold")
            if drop_caches():
                log("scan: first launch, cold page cache, new cache folder")
                scan["cold_first"] = launch(small, cold_cache)
                drop_caches()
                log("scan: second launch, cold page cache")
                scan["cold_second"] = launch(small, cold_cache)
                scan["cold_second_over_first"] = round(scan["cold_second"]["scan_s"] / scan["cold_first"]["scan_s"], 4)
            else:
                cold = False
                result["cold_skipped"] = f"writing {DROP_CACHES} is not permitted"
        log("scan: one carp-fast bench-data launch on the warm cache")
        bench = run_json(carp_fast_command() + [
            "bench-data", "--data", str(small), "--backend", "dali", "--batch-size", str(args.batch_size),
            "--workers", str(args.workers), "--seconds", "1", "--warmup", "1", "--global-size", str(args.global_size),
            "--local-size", str(args.local_size)], dict(os.environ, CARP_FAST_CACHE=cache))
        scan["bench_data"] = {k: bench[k] for k in ("scan_s", "startup_s", "num_images")}
        result["scan"] = scan
        shutil.rmtree(small)

        # ---- 2. converter
        src = work / "src" / "train"
        log(f"making {args.images} ImageNet-sized JPEGs in {src} (2 processes)")
        started = time.perf_counter()
        make_imagenet_like(src, args.images, args.classes)
        nbytes = folder_bytes(src)
        n_images = sum(1 for _ in src.rglob("*.JPEG"))
        result["imagenet_like"] = {"images": n_images, "classes": args.classes, "mb": round(nbytes / 1e6, 1),
                                   "mean_kb": round(nbytes / n_images / 1e3, 1),
                                   "make_s": round(time.perf_counter() - started, 1)}
        dst = work / "shards"
        os.sync()  # the generated folder's dirty pages are not the converter's to write
        convert_result: dict = {"load": load()}
        log("converter: warm page cache")
        convert_result["warm"] = convert(work / "src", dst, args.shard_size, work / "cache_convert", nbytes)
        log("tar reference: warm page cache")
        convert_result["tar_warm"] = tar_reference(src, work / "ref.tar", nbytes)
        result["convert"] = convert_result

        # ---- 3. shards against the folder
        os.environ["CARP_FAST_CACHE"] = str(work / "cache_convert")  # the folder's scan is cached by the converter
        from carp_fast.pipelines import ImageFolderSource, MultiCropConfig, ShardSource
        from carp_fast.pipelines import dali_loader

        FeedClock.install()
        folder_source = ImageFolderSource(src).check()
        shard_source = ShardSource(dst / "train")
        same = (len(folder_source) == len(shard_source)
                and np.array_equal(folder_source.labels, shard_source.labels)
                and all(np.array_equal(folder_source.encoded(i), shard_source.encoded(i))
                        for i in range(0, len(folder_source), max(1, len(folder_source) // 50))))
        if not same:
            raise RuntimeError("the shards do not hold the folder's images in its order: not comparable")
        sources = {"folder": folder_source, "shards": shard_source}
        crops = MultiCropConfig(global_crops=2, global_size=args.global_size, local_crops=6, local_size=args.local_size)
        through: dict = {"load": load(), "crops": f"2x{args.global_size}+6x{args.local_size}",
                         "runs": {"folder": [], "shards": []}}
        log("read only, warm")
        through["read_only_warm"] = {name: read_only(s, dali_loader.READ_THREADS) for name, s in sources.items()}
        for r in range(args.rounds):
            for name, source in sources.items():
                log(f"pipeline, warm: {name}, round {r + 1} of {args.rounds}")
                through["runs"][name].append(pipeline_run(source, crops, args.batch_size, args.workers, args.seconds,
                                                          args.warmup))
        med = {name: statistics.median(x["images_per_s"] for x in runs) for name, runs in through["runs"].items()}
        through["median_images_per_s"] = med
        through["shards_over_folder"] = round(med["shards"] / med["folder"], 3)
        through["load_end"] = load()
        result["throughput"] = through

        # ---- 4. cold page cache
        if cold:
            cold_result: dict = {"load": load()}
            drop_caches()
            log("converter: cold page cache")
            cold_result["convert"] = convert(work / "src", work / "shards_cold", args.shard_size,
                                             work / "cache_convert_cold", nbytes)
            shutil.rmtree(work / "shards_cold")
            drop_caches()
            log("tar reference: cold page cache")
            cold_result["tar"] = tar_reference(src, work / "ref.tar", nbytes)
            cold_result["read_only"] = {}
            for name, source in sources.items():
                drop_caches()
                log(f"read only, cold: {name}")
                cold_result["read_only"][name] = read_only(source, dali_loader.READ_THREADS)
            cold_result["pipeline"] = {}
            for name, source in sources.items():
                drop_caches()
                log(f"pipeline, cold: {name}")
                cold_result["pipeline"][name] = pipeline_run(source, crops, args.batch_size, args.workers,
                                                             args.seconds, args.warmup)
            p = cold_result["pipeline"]
            cold_result["shards_over_folder"] = round(p["shards"]["images_per_s"] / p["folder"]["images_per_s"], 3)
            result["cold"] = cold_result
    finally:
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    result["targets"] = {
        "scan_second_under_quarter_of_first": result["scan"]["second_over_first"] < 0.25,
        "shards_at_least_folder": result["throughput"]["shards_over_folder"] >= 1.0}
    result["load_end"] = load()
    result["total_s"] = round(time.perf_counter() - t_start, 1)
    return result


def table(result: dict) -> str:
    rows: list[tuple[str, str]] = []
    s = result["scan"]
    n = result["small_folder"]["files"]
    for key, what in (("first", "first launch (empty cache)"), ("second", "second launch"),
                      ("after_one_change", "after one file rewritten"), ("cache_off", "CARP_FAST_CACHE=off"),
                      ("cold_first", "first launch, cold page cache"), ("cold_second", "second launch, cold page cache")):
        if key in s:
            x = s[key]
            rows.append((f"scan {n:,} files: {what}",
                         f"scan_s {x['scan_s']:.3f} (list {x['list_s']:.3f} + check {x['check_s']:.3f}), "
                         f"{x['checked']:,} checked, process {x['wall_s']:.1f} s"))
    rows.append(("scan: second / first", f"{s['second_over_first']:.3f} (target < 0.25)"))
    rows.append(("scan: after one change / first", f"{s['after_change_over_first']:.3f}"))
    if "cold_second_over_first" in s:
        rows.append(("scan, cold: second / first", f"{s['cold_second_over_first']:.3f}"))
    rows.append(("scan cache file", f"{s['cache_mb']:.2f} MB"))
    b = s["bench_data"]
    rows.append(("bench-data (warm cache)", f"scan_s {b['scan_s']:.3f}, startup_s {b['startup_s']:.3f}"))
    im = result["imagenet_like"]
    rows.append(("ImageNet-like source", f"{im['images']:,} JPEGs, {im['mb']:.1f} MB, {im['mean_kb']:.1f} KB each"))
    c = result["convert"]
    for key, label in (("warm", "converter, warm"),):
        x = c[key]
        rows.append((label, f"{x['mb_per_s']:.1f} MB/s ({x['convert_s']:.2f} s; {x['shards']} shards, "
                            f"{x['out_mb']:.1f} MB); with sync {x['mb_per_s_synced']:.1f} MB/s"))
    x = c["tar_warm"]
    rows.append(("tar -cf, warm (reference)", f"{x['mb_per_s']:.1f} MB/s ({x['tar_s']:.2f} s); with sync "
                                              f"{x['mb_per_s_synced']:.1f} MB/s"))
    t = result["throughput"]
    for name in ("folder", "shards"):
        r = t["read_only_warm"][name]
        rows.append((f"read only, warm: {name}", f"{r['images_per_s']:,.0f} images/s ({r['mb_per_s']:.0f} MB/s)"))
    for name in ("folder", "shards"):
        runs = t["runs"][name]
        speeds = " / ".join(f"{x['images_per_s']:.1f}" for x in runs)
        waits = " / ".join(f"{100 * x['feed_wait']:.2f}" for x in runs)
        rows.append((f"pipeline {t['crops']}, warm: {name}",
                     f"{speeds} images/s (median {t['median_images_per_s'][name]:.1f}); feed_wait {waits} %"))
    rows.append(("shards / folder (medians)", f"{t['shards_over_folder']:.3f} (target >= 1)"))
    if "cold" in result:
        c = result["cold"]
        x = c["convert"]
        rows.append(("converter, cold", f"{x['mb_per_s']:.1f} MB/s ({x['convert_s']:.2f} s); with sync "
                                        f"{x['mb_per_s_synced']:.1f} MB/s"))
        x = c["tar"]
        rows.append(("tar -cf, cold (reference)", f"{x['mb_per_s']:.1f} MB/s ({x['tar_s']:.2f} s)"))
        for name in ("folder", "shards"):
            r = c["read_only"][name]
            rows.append((f"read only, cold: {name}", f"{r['images_per_s']:,.0f} images/s ({r['mb_per_s']:.0f} MB/s)"))
        for name in ("folder", "shards"):
            r = c["pipeline"][name]
            rows.append((f"pipeline, cold: {name}", f"{r['images_per_s']:.1f} images/s, feed_wait "
                                                    f"{100 * r['feed_wait']:.2f} %, first batch {r['first_batch_s']:.2f} s"))
        rows.append(("cold: shards / folder", f"{c['shards_over_folder']:.3f}"))
    elif "cold_skipped" in result:
        rows.append(("cold page cache", f"skipped: {result['cold_skipped']}"))
    rows.append(("load average (1, 5, 15 min)", f"start {result['load_start']}, end {result['load_end']}"))
    rows.append(("total", f"{result['total_s']:.0f} s"))
    width = max(len(r[0]) for r in rows)
    return "\n".join(f"{a:<{width}}  {b}" for a, b in rows)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tmp", default="/tmp", help="where the work folder is made (deleted at the end)")
    p.add_argument("--scan-files", type=int, default=30_000, help="small JPEGs for the scan-once measurement")
    p.add_argument("--images", type=int, default=2_400, help="ImageNet-sized JPEGs (~100 KB) for converter and pipeline")
    p.add_argument("--classes", type=int, default=8)
    p.add_argument("--shard-size", type=int, default=500, help="images per shard (500 x 100 KB: about 50 MB)")
    p.add_argument("--seconds", type=float, default=25.0, help="timed window of each pipeline run")
    p.add_argument("--warmup", type=int, default=3, help="batches before the clock starts")
    p.add_argument("--rounds", type=int, default=2, help="folder/shards alternations")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", type=int, default=2, help="DALI threads")
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--cold", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure after dropping the page cache (needs root; skipped with a note otherwise)")
    p.add_argument("--keep", action="store_true", help="keep the generated data")
    args = p.parse_args(argv)
    if min(args.scan_files, args.images, args.classes, args.shard_size, args.rounds, args.warmup) < 1 or args.seconds <= 0:
        p.error("sizes, --rounds and --warmup must be >= 1, --seconds > 0")
    return args


def main(argv: list[str] | None = None) -> dict:
    result = run(parse(argv))
    print(table(result))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
