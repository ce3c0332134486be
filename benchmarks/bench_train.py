"""Training-step speed: carp_fast's Learner against the paper's plain step and the compute ceiling.

    python benchmarks/bench_train.py --arch resnet50 --batch-size 96 --precision bf16 --steps 20
    python benchmarks/bench_train.py --arch resnet18_small --global-size 32 --local-size 16 \\
        --prototypes 4096 --block-size 256 --batch-size 8 --steps 3          # CPU smoke run

Three measurements on the same device, the same synthetic batch (already on the device, so
no input pipeline is timed) and the same initial weights, alternated ``--repeats`` times so
that machine noise hits them alike; each reports the median over repeats:

- ``ours``: what users run, ``learn.fit`` of :func:`carp_fast.carp.carp_learner` with
  every callback it trains with (gradient accumulation, precision, schedules, teacher EMA,
  statistics, recorder, progress measurement), on a loader that repeats the batch;
- ``baseline``: the step of the paper's official loop (``benchmarks/paper_step.py``):
  fp16 + grad scaler on CUDA (fp32 on the CPU by default), ``[N, K]`` logits gathered per
  view, per-parameter LARS and EMA loops, NCHW;
- ``ceiling``: the backbone passes alone (student forward + backward, one pass per
  resolution; teacher forward on the global crops) with ours' precision and memory format:
  no step can be faster.

The last line printed is one JSON object (see :func:`run`). Timing: ``time.perf_counter``
around the timed steps, with one device synchronisation at each end on a GPU. Peak memory:
``torch.cuda.max_memory_allocated`` per measurement on CUDA; on the CPU the process's peak
RSS (``resource.getrusage``), one number for the whole run.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import torch
from fastai.callback.core import Callback
from torch import Tensor

if __package__ in (None, ""):  # run as a script: make the repository's benchmarks/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.paper_step import PaperStep, autocast, baseline_loss, blocks_by_gather  # noqa: E402
from carp_fast.backbones import ARCHITECTURES  # noqa: E402
from carp_fast.callbacks.precision import PRECISIONS, auto_channels_last, auto_precision  # noqa: E402
from carp_fast.carp import CARPConfig, carp_learner  # noqa: E402
from carp_fast.loss import carp_block_loss  # noqa: E402
from carp_fast.carp import CARPStudentTeacher  # noqa: E402
from carp_fast.networks import batches_by_resolution  # noqa: E402


# ----------------------------------------------------------------------------- the batch

def synthetic_crops(batch_size: int, global_crops: int, global_size: int, local_crops: int, local_size: int,
                    device: torch.device, seed: int = 0) -> list[Tensor]:
    """One multi-crop batch: ``global_crops`` tensors ``[N, 3, G, G]`` then ``local_crops``
    tensors ``[N, 3, L, L]``, standard-normal (like normalised images), contiguous NCHW."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [global_size] * global_crops + [local_size] * local_crops
    return [torch.randn(batch_size, 3, s, s, generator=gen).to(device) for s in sizes]


# ----------------------------------------------------------------------------- our step

class StepTimer(Callback):
    """Seconds per training step of a fit, the first ``skip`` batches excluded (warm-up).

    Times from the end of batch ``skip - 1`` to the end of the last batch, so everything a
    batch does (every callback's work included) is inside the clock; on CUDA the device is
    synchronised at those two points only.
    """

    order = 1000  # after_batch after every other callback

    def __init__(self, skip: int):
        self.skip, self.seconds = skip, []

    def after_batch(self):
        if self.iter == self.skip - 1 or self.iter == self.n_iter - 1:
            _synchronize(self.dls.device)
            now = time.perf_counter()
            if self.iter == self.skip - 1:
                self._start = now
            else:
                self.seconds.append((now - self._start) / (self.n_iter - self.skip))


class RepeatedBatch:
    """A loader that yields the same (already on-device) batch ``n`` times: no data cost."""

    def __init__(self, batch: tuple, n: int):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __iter__(self):
        return (self.batch for _ in range(self.n))


def learner_step(config: CARPConfig, crops: Sequence[Tensor], steps: int, warmup: int, method=None):
    """carp_fast's Learner with every callback it trains with, on one in-memory batch
    (``method``: any :class:`~carp_fast.method.Method`, CARP by default, with its ``config``).

    Returns ``(learn, step)``: ``step()`` runs one ``learn.fit(1)`` of ``warmup + steps``
    batches and returns its seconds per step (``warmup`` batches untimed).
    """
    from accelerate import Accelerator
    from fastai.data.core import DataLoaders

    device = crops[0].device
    labels = torch.zeros(crops[0].shape[0], dtype=torch.long, device=device)
    dls = DataLoaders(RepeatedBatch((*crops, labels), warmup + steps), [])
    timer = StepTimer(skip=warmup)
    accelerator = Accelerator(cpu=device.type == "cpu")
    if method is None:
        learn = carp_learner(dls, config, accelerator=accelerator, cbs=[timer], progress=False)
    else:
        from carp_fast.learner import method_learner

        learn = method_learner(method, dls, config, accelerator=accelerator, cbs=[timer], progress=False)

    def step() -> float:
        learn.fit(1)
        return timer.seconds[-1]

    return learn, step


# ----------------------------------------------------------------------------- the ceiling

class CeilingStep:
    """Backbone passes alone, with ours' precision and memory format: student forward +
    backward on all crops (one pass per resolution), teacher forward on the global crops.
    No head, prototypes, loss, optimizer or EMA."""

    def __init__(self, model: CARPStudentTeacher, precision: str, channels_last: bool):
        self.model, self.precision, self.channels_last = model, precision, channels_last
        self.device = next(model.parameters()).device
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.backbone_params = list(model.student.backbone.parameters())

    def __call__(self, crops: Sequence[Tensor]) -> Tensor:
        model = self.model
        if self.channels_last:
            crops = [x.contiguous(memory_format=torch.channels_last) for x in crops]
        with autocast(self.device, self.precision):
            total = sum(model.student.backbone(x).float().sum() for x in batches_by_resolution(crops))
            with torch.no_grad():
                for x in batches_by_resolution(crops[: model.global_crops]):
                    model.teacher.backbone(x)
        total.backward()
        for p in self.backbone_params:
            p.grad = None
        return total.detach()


# ----------------------------------------------------------------------------- timing

def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable, crops: Sequence[Tensor], n_steps: int, device: torch.device) -> float:
    """Seconds per step over ``n_steps`` back-to-back steps (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(n_steps):
            step(crops)
        end.record()
        end.synchronize()  # the one host sync of the repeat
        return start.elapsed_time(end) / 1000 / n_steps
    start = time.perf_counter()
    for _ in range(n_steps):
        step(crops)
    return (time.perf_counter() - start) / n_steps


def time_logit_paths(n_rows: int, n_student: int, n_teacher: int, dim: int, n_prototypes: int, block_size: int,
                     device: torch.device, steps: int, repeats: int, precision: str = "fp32") -> dict:
    """Prototype logits + loss, forward and backward, alone: block logits from the permuted
    prototype matrix (ours) against full ``[N, K]`` logits gathered per view (the paper).

    Under bf16 every path runs in bf16 autocast, as a training step does; ours computes its
    block logits in float32 there (issue 19), and a third path, ``block_bf16``, is the same
    with the matmul left to autocast (bf16), as carp_fast did before: their ratio is the cost
    of float32 logits.

    Args:
        n_rows: N images per view; ``z`` is ``[V_s*N, D]`` with grad, ``w`` ``[V_t*N, D]``.

    Returns:
        milliseconds per pass (median over repeats) of each path and their ratios.
    """
    import contextlib

    import torch.nn.functional as F

    from carp_fast.networks import Prototypes

    gen = torch.Generator().manual_seed(1)
    protos = Prototypes(dim, n_prototypes).to(device)
    z = torch.randn(n_student * n_rows, dim, generator=gen).to(device).requires_grad_()
    w = torch.randn(n_teacher * n_rows, dim, generator=gen).to(device)
    partition = torch.randperm(n_prototypes, generator=gen)[: n_prototypes // block_size * block_size]
    partition = partition.view(-1, block_size).to(device)  # [P, B]

    def block(_):
        s = protos.block_logits(z, partition).view(n_student, n_rows, *partition.shape)  # [V_s, N, P, B]
        with torch.no_grad():
            t = protos.block_logits(w, partition).view(n_teacher, n_rows, *partition.shape)
        carp_block_loss(s, t).total.backward()

    def gather(_):
        perm = partition.flatten()
        preds = [blocks_by_gather(x, perm, block_size) for x in protos(z).chunk(n_student)]
        with torch.no_grad():
            targets = [blocks_by_gather(x, perm, block_size) for x in protos(w).chunk(n_teacher)]
        baseline_loss(preds, targets).backward()

    def block_bf16(_):  # the block logits before issue 19: the matmul in autocast's bf16
        rows = F.normalize(protos.weight.index_select(0, partition.flatten()), dim=1)
        s = (z @ rows.t()).view(n_student, n_rows, *partition.shape)
        with torch.no_grad():
            t = (w @ rows.t()).view(n_teacher, n_rows, *partition.shape)
        carp_block_loss(s, t).total.backward()

    paths = {"block": block, "gather": gather}
    if precision == "bf16":
        paths["block_bf16"] = block_bf16

    def under_precision(fn):
        def run(batch):
            context = torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
            with context:
                fn(batch)
        return run

    paths = {name: under_precision(fn) for name, fn in paths.items()}
    for fn in paths.values():
        fn(None)
    times = {name: [] for name in paths}
    for r in range(repeats):
        for name in rotated(list(paths), r):
            times[name].append(time_steps(paths[name], [], steps, device))
    ms = {name: round(statistics.median(t) * 1000, 3) for name, t in times.items()}
    result = {**{f"{k}_ms": v for k, v in ms.items()}, "gather_over_block": round(ms["gather"] / ms["block"], 3),
              "precision": precision}
    if "block_bf16" in ms:
        result["block_over_block_bf16"] = round(ms["block"] / ms["block_bf16"], 3)
    return result


def _paired(reference: list[float], ours: list[float]) -> float:
    """Median over repeats of ``reference_seconds / ours_seconds`` (= ours' images/s ratio)."""
    return statistics.median(r / o for r, o in zip(reference, ours))


def rotated(names: list[str], r: int) -> list[str]:
    """``names`` started at position ``r``: repeat r times the measurements in this order, so
    drift in the machine's load hits them alike."""
    return names[r % len(names):] + names[: r % len(names)]


def _peak_rss_mib() -> float:
    # ru_maxrss is in KiB on Linux, bytes on macOS.
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10


# ----------------------------------------------------------------------------- the run

def run(args: argparse.Namespace, log: Callable[[str], None] = print) -> dict:
    """Build the three measurements, warm them up, time them alternately, return the result.

    Returns:
        a JSON-ready dict: ``images_per_s`` (ours), ``baseline_images_per_s``,
        ``ceiling_images_per_s``, ``ours_over_baseline``, ``ours_over_ceiling`` (ratios of
        the medians) and their ``_paired`` forms (medians of per-repeat ratios),
        ``step_ms`` and ``images_per_s_repeats`` per measurement, ``peak_memory_mib``
        with ``peak_memory_kind``, and the settings.
    """
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    precision = args.precision or auto_precision(device)  # the learner's "auto"
    baseline_precision = args.baseline_precision or ("fp16" if device.type == "cuda" else "fp32")
    channels_last = auto_channels_last(device, precision) if args.channels_last is None else args.channels_last
    if baseline_precision == "fp16" and device.type != "cuda":
        raise ValueError(f"--baseline-precision fp16 is the official code's CUDA path (got {device}); use bf16 or fp32")
    torch.manual_seed(args.seed)

    config = CARPConfig(
        arch=args.arch, n_prototypes=args.prototypes, block_size=args.block_size, global_crops=args.global_crops,
        hidden_dim=args.hidden_dim, embed_dim=args.embed_dim, batch_size=args.batch_size, global_batch=args.batch_size,
        precision=precision, channels_last=channels_last, seed=args.seed, log_every=args.log_every, sync_bn=False,
        final_lr=0.0,  # any end: the schedule's values do not change the cost of a step
    )
    crops = synthetic_crops(args.batch_size, args.global_crops, args.global_size, args.local_crops,
                            args.local_size, device, seed=args.seed)
    learn, ours = learner_step(config, crops, args.steps, args.warmup)
    initial = copy.deepcopy(learn.model).cpu()  # the learner's initial weights for the other two
    baseline = PaperStep(copy.deepcopy(initial).to(device).train(), baseline_precision)
    ceiling = CeilingStep(copy.deepcopy(initial).to(device).train(), precision, channels_last)
    steps = {
        "ours": ours,
        "baseline": lambda: time_steps(baseline, crops, args.steps, device),
        "ceiling": lambda: time_steps(ceiling, crops, args.steps, device),
    }

    log(f"bench-train: {args.arch}, {args.global_crops}x{args.global_size} + {args.local_crops}x{args.local_size} "
        f"crops, K={args.prototypes}, B={args.block_size}, batch {args.batch_size}, ours {precision}"
        f"{' channels_last' if channels_last else ''}, baseline {baseline_precision}, on {_device_name(device)}")
    warmup_s = {}
    for name, step in (("baseline", baseline), ("ceiling", ceiling)):
        start = time.perf_counter()
        for _ in range(args.warmup):
            step(crops)
        _synchronize(device)
        warmup_s[name] = round(time.perf_counter() - start, 2)
    start = time.perf_counter()
    ours()  # a first fit: the Learner's own set-up, then `warmup` untimed batches in every fit
    warmup_s["ours"] = round(time.perf_counter() - start, 2)
    log(f"warm-up seconds: {warmup_s}")

    host_syncs = None
    if device.type == "cuda" and args.sync_debug:
        # Every synchronizing CUDA call inside one fit of ours becomes a warning; count them per step.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ours()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        messages = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        host_syncs = len(messages) / (args.warmup + args.steps)
        log(f"host syncs per step of ours: {host_syncs:.2f}" + "".join(f"\n  {m}" for m in messages[:20]))

    seconds = {name: [] for name in steps}
    peak = {name: 0.0 for name in steps}
    for r in range(args.repeats):
        for name in rotated(list(steps), r):  # alternate the order so drift hits all three
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds[name].append(steps[name]())
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2**20)
        log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} {args.batch_size / s[-1]:.2f} img/s" for n, s in seconds.items()))
    last_loss = learn.carp_stats.history[-1]["loss"]  # is ours still computing a finite loss?

    ips = {name: args.batch_size / statistics.median(s) for name, s in seconds.items()}
    result = {
        "images_per_s": round(ips["ours"], 3),
        "baseline_images_per_s": round(ips["baseline"], 3),
        "ceiling_images_per_s": round(ips["ceiling"], 3),
        "ours_over_baseline": round(ips["ours"] / ips["baseline"], 4),
        "ours_over_ceiling": round(ips["ours"] / ips["ceiling"], 4),
        # Per-repeat ratios of adjacent measurements: steadier than the ratio of medians when
        # the machine's load drifts between repeats.
        "ours_over_baseline_paired": round(_paired(seconds["baseline"], seconds["ours"]), 4),
        "ours_over_ceiling_paired": round(_paired(seconds["ceiling"], seconds["ours"]), 4),
        "step_ms": {name: round(statistics.median(s) * 1000, 2) for name, s in seconds.items()},
        "images_per_s_repeats": {name: [round(args.batch_size / t, 3) for t in s] for name, s in seconds.items()},
        "warmup_s": warmup_s,
        "host_syncs_per_step": host_syncs,
        "loss_finite": bool(torch.isfinite(torch.tensor(last_loss)).item()),
    }
    if device.type == "cuda":
        result |= {"peak_memory_mib": round(peak["ours"], 1), "baseline_peak_memory_mib": round(peak["baseline"], 1),
                   "ceiling_peak_memory_mib": round(peak["ceiling"], 1),
                   "peak_memory_kind": "cuda max_memory_allocated per measurement (includes the other "
                                       "measurements' resident weights and optimizer state)"}
    else:
        result |= {"peak_memory_mib": round(_peak_rss_mib(), 1),
                   "peak_memory_kind": "cpu peak RSS of the whole process (all three measurements)"}
    if args.logit_bench:
        n_rows = args.logit_batch_size or args.batch_size
        result["logit_path"] = {"batch_size": n_rows, **time_logit_paths(n_rows, len(crops), args.global_crops, args.embed_dim,
                                                args.prototypes, args.block_size, device, args.steps, args.repeats,
                                                precision)}
    result |= {
        "arch": args.arch, "batch_size": args.batch_size, "global_crops": args.global_crops,
        "global_size": args.global_size, "local_crops": args.local_crops, "local_size": args.local_size,
        "prototypes": args.prototypes, "block_size": args.block_size, "precision": precision,
        "baseline_precision": baseline_precision, "channels_last": channels_last, "log_every": args.log_every,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "device": _device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
    }
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="benchmarks/bench_train.py", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--arch", default="resnet50", choices=ARCHITECTURES)
    p.add_argument("--global-crops", type=int, default=2)
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-crops", type=int, default=6)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--prototypes", type=int, default=65536, help="K")
    p.add_argument("--block-size", type=int, default=512, help="B, prototypes per partition block")
    p.add_argument("--hidden-dim", type=int, default=2048, help="projection head hidden width")
    p.add_argument("--embed-dim", type=int, default=256, help="projection head output width D")
    p.add_argument("--batch-size", type=int, default=64,
                   help="images per device; on a GPU use the largest that fits (peak memory is printed)")
    p.add_argument("--precision", choices=PRECISIONS, default=None,
                   help="ours' autocast dtype; default: the learner's 'auto' (bf16 on CUDA and on CPUs with bf16 units)")
    p.add_argument("--baseline-precision", choices=PRECISIONS, default=None,
                   help="default fp16 + grad scaler on CUDA (the official code), fp32 on CPU")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="ours' memory format; default: as the learner (on with CUDA and on oneDNN CPUs)")
    p.add_argument("--log-every", type=int, default=50, help="ours: batches between the statistics' host syncs (CARPConfig.log_every)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement and repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per measurement first (in every fit of ours)")
    p.add_argument("--repeats", type=int, default=3, help="alternations of the three measurements; the median is reported")
    p.add_argument("--logit-bench", action="store_true",
                   help="also time the prototype-logit + loss path alone: block logits vs [N, K] gather")
    p.add_argument("--logit-batch-size", type=int, default=None,
                   help="N per view for --logit-bench (default --batch-size): the path alone is cheap on a CPU "
                        "even at a GPU's per-device batch")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: count the host syncs per step of ours (torch.cuda.set_sync_debug_mode('warn'))")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU: torch intra-op threads (default torch's); fewer than cores is steadier on a shared machine")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--seed", type=int, default=0)
    return p


def main(argv: list[str] | None = None) -> dict:
    """Command-line entry: prints progress, then the result as one JSON line (the last line)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if min(args.steps, args.repeats, args.batch_size, args.global_crops) < 1 or args.warmup < 1:
        parser.error("--steps, --repeats, --batch-size, --global-crops and --warmup must be >= 1")
    if args.global_crops + args.local_crops < 2:
        parser.error("need at least 2 crops: the loss pairs student view i with teacher view j != i")
    if not 1 <= args.block_size <= args.prototypes:
        parser.error(f"--block-size must be in [1, --prototypes={args.prototypes}], got {args.block_size}")
    threads = torch.get_num_threads()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    try:
        result = run(args, log=lambda line: print(line, file=sys.stderr, flush=True))
    except ValueError as err:
        parser.error(str(err))
    finally:
        torch.set_num_threads(threads)  # main() may run inside another program (the tests)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
