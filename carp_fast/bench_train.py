"""Training-step speed: our CARP step against a plain baseline and the compute ceiling.

    carp-fast bench-train --arch resnet50 --batch-size 96 --precision bf16 --steps 20
    python -m carp_fast.bench_train --arch resnet18_small --global-size 32 --local-size 16 \\
        --prototypes 4096 --block-size 256 --batch-size 8 --steps 3          # CPU smoke run

Three measurements on the same device, the same synthetic batch (already on the device)
and the same initial weights, alternated ``--repeats`` times so that machine noise hits
them alike; each reports the median over repeats:

- ``ours``: the library's step. ``StudentTeacher`` forward (block logits from the permuted
  prototype matrix, no ``[N, K]`` gather), ``carp_block_loss`` (softmax and loss in fp32),
  backward, foreach LARS, fused EMA (``torch._foreach_lerp_``); ``--precision`` autocast,
  channels_last and ``torch.compile`` as chosen.
- ``baseline``: the step written the way the paper's official loop does it (appendix E):
  fp16 autocast with a grad scaler on CUDA (fp32 on the CPU by default), full ``[N, K]``
  logits gathered per view with ``logits[:, perm.flatten()].split(B)``, a per-parameter
  LARS loop, a per-parameter ``p.data = ...`` EMA loop, NCHW, no compile.
- ``ceiling``: the backbone passes alone (student forward + backward, one pass per
  resolution; teacher forward on the global crops) with ours' precision, memory format and
  compiled backbones: no step can be faster.

The last line printed is one JSON object (see :func:`run`). Timing: CUDA events and one
synchronize per repeat on a GPU, ``time.perf_counter`` on the CPU. Peak memory:
``torch.cuda.max_memory_allocated`` per measurement on CUDA; on the CPU the process's peak
RSS (``resource.getrusage``), one number for the whole run.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .backbones import ARCHITECTURES
from .callbacks.precision import auto_channels_last, auto_precision
from .callbacks.teacher_ema import ema_update
from .lars import LARS
from .loss import carp_block_loss
from .networks import StudentTeacher, batches_by_resolution

PRECISIONS = ("bf16", "fp16", "fp32")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
LR, TEACHER_MOMENTUM = 0.05, 0.996  # constant: their values do not change the cost of a step


# ----------------------------------------------------------------------------- the batch

def synthetic_crops(batch_size: int, global_crops: int, global_size: int, local_crops: int, local_size: int,
                    device: torch.device, seed: int = 0) -> list[Tensor]:
    """One multi-crop batch: ``global_crops`` tensors ``[N, 3, G, G]`` then ``local_crops``
    tensors ``[N, 3, L, L]``, standard-normal (like normalised images), contiguous NCHW."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [global_size] * global_crops + [local_size] * local_crops
    return [torch.randn(batch_size, 3, s, s, generator=gen).to(device) for s in sizes]


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def _scaler(device: torch.device, precision: str):
    # fp16 needs loss scaling; GradScaler.step reads found_inf on the host (a sync per step).
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def _backward_and_step(loss: Tensor, opt: torch.optim.Optimizer, scaler) -> None:
    """Backward, optimizer step (through the grad scaler when there is one), zero grads."""
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    else:
        loss.backward()
        opt.step()
    opt.zero_grad(set_to_none=True)


# ----------------------------------------------------------------------------- our step

class OurStep:
    """The library's training step: forward, ``carp_block_loss``, backward, LARS, EMA.

    Args:
        model: the :class:`StudentTeacher` (moved to the device; this step owns it).
        precision: autocast dtype for the forward pass; the loss runs in fp32 regardless.
        channels_last: convert the model once and the crops every step (as the learner's
            ``_ChannelsLastInputs`` does), so the conversion is part of the measured cost.
        compile_mode: None, or a ``torch.compile`` mode for the backbones, heads and loss
            (``"reduce-overhead"`` records CUDA graphs on a GPU).
    """

    def __init__(self, model: StudentTeacher, precision: str, channels_last: bool, compile_mode: str | None):
        self.model, self.precision, self.channels_last = model, precision, channels_last
        self.device = next(model.parameters()).device
        self.student_params = list(model.student.parameters())
        self.teacher_params = list(model.teacher.parameters())
        if channels_last:
            model.to(memory_format=torch.channels_last)
        self.loss_fn: Callable = carp_block_loss
        self.compile_mode = compile_mode
        if compile_mode is not None:
            for net in (model.student, model.teacher):
                # dynamic=False: two crop sizes give two static graphs, not symbolic shapes.
                net.backbone = torch.compile(net.backbone, mode=compile_mode, dynamic=False)
                net.head = torch.compile(net.head, mode=compile_mode, dynamic=False)
            self.loss_fn = torch.compile(carp_block_loss, mode=compile_mode, dynamic=False)
        self.opt = LARS(self.student_params, lr=LR, momentum=0.9, weight_decay=1e-6, eta=0.001)
        self.scaler = _scaler(self.device, precision)

    def __call__(self, crops: Sequence[Tensor]) -> Tensor:
        if self.compile_mode == "reduce-overhead" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the last step may be reused
        if self.channels_last:
            crops = [x.contiguous(memory_format=torch.channels_last) for x in crops]
        with _autocast(self.device, self.precision):
            out = self.model(*crops)  # student [V_s, N, P, B], teacher [V_t, N, P, B]
            loss = self.loss_fn(out.student, out.teacher).total
        _backward_and_step(loss, self.opt, self.scaler)
        ema_update(self.teacher_params, self.student_params, TEACHER_MOMENTUM)
        return loss.detach()


# ----------------------------------------------------------------------------- the baseline

class LoopLARS(torch.optim.Optimizer):
    """LARS written per parameter, as the official CARP / DINO / BYOL code has it.

    Same update as :class:`carp_fast.lars.LARS` (so both give the same parameters), one
    Python iteration and several small kernels per parameter.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:  # no weight decay and no trust ratio for biases and BatchNorm
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def _blocks_by_gather(logits: Tensor, perm: Tensor, block_size: int) -> Tensor:
    """Paper appendix E ``get_logits_gr``: ``[N, K] -> [P, N, B]`` probabilities.

    The softmax runs in fp32, as CUDA fp16 autocast runs it."""
    blocks = logits[:, perm].split(block_size, dim=1)  # P x [N, B]; the gather copies [N, K]
    return F.softmax(torch.stack(blocks, dim=0).float(), dim=-1)  # [P, N, B]


def baseline_loss(preds: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Paper appendix E ``loss_fn`` for V_s student and V_t teacher views.

    Args:
        preds: V_s student probabilities ``[P, N, B]``; targets: V_t teacher ones (detached).

    The appendix sums its two (i, j) pairs and writes ``log(K)``; here the pairs are
    averaged and the constant is ``log(B)``, the objective of DESIGN.md section 1, so that
    the two implementations compute one number. ``clamp`` guards the log as the library does.
    """
    eps = torch.finfo(torch.float32).eps
    pairs = [(i, j) for i in range(len(preds)) for j in range(len(targets)) if i != j]
    consistency = sum(-torch.log(torch.einsum("knc,knc->kn", preds[i], targets[j]).clamp(eps, 1 - eps)).mean()
                      for i, j in pairs) / len(pairs)
    probs = torch.cat([torch.cat(list(preds), dim=1), torch.cat(list(targets), dim=1)], dim=1)  # [P, V*N, B]
    pbar = probs.mean(dim=1)  # [P, B]
    entropy = (math.log(pbar.shape[-1]) + (pbar * torch.log(pbar)).sum(dim=-1)).mean()
    return consistency + entropy


class BaselineStep:
    """The plain step of the paper's official loop; see the module docstring.

    Args:
        model: its own :class:`StudentTeacher` (a copy of ours' initial weights).
        precision: ``"fp16"`` (with a grad scaler) on CUDA as the official code; on the CPU
            ``"fp32"`` (default) or ``"bf16"``.
    """

    def __init__(self, model: StudentTeacher, precision: str):
        self.model, self.precision = model, precision
        self.device = next(model.parameters()).device
        self.opt = LoopLARS(model.student.parameters(), lr=LR)
        self.scaler = _scaler(self.device, precision)

    def __call__(self, crops: Sequence[Tensor]) -> Tensor:
        model, n_student, n_teacher = self.model, len(crops), self.model.global_crops
        with _autocast(self.device, self.precision):
            z = model.student.embed(crops)  # [V_s*N, D]
            with torch.no_grad():
                w = model.teacher.embed(crops[:n_teacher])  # [V_t*N, D]
            partition = model.partitioner(device=z.device)  # [P, B]
            perm, block_size = partition.flatten(), partition.shape[1]
            s_logits = model.student.prototypes(z).chunk(n_student)  # V_s x [N, K]
            preds = [_blocks_by_gather(x, perm, block_size) for x in s_logits]  # V_s x [P, N, B]
            with torch.no_grad():
                t_logits = model.teacher.prototypes(w).chunk(n_teacher)  # V_t x [N, K]
                targets = [_blocks_by_gather(x, perm, block_size) for x in t_logits]
            loss = baseline_loss(preds, targets)
        _backward_and_step(loss, self.opt, self.scaler)
        with torch.no_grad():
            m = TEACHER_MOMENTUM
            for pt, ps in zip(model.teacher.parameters(), model.student.parameters()):
                pt.data = pt.data * m + ps.data * (1 - m)
        return loss.detach()


# ----------------------------------------------------------------------------- the ceiling

class CeilingStep:
    """Backbone passes alone, with ours' (possibly compiled) backbones, precision and format:
    student forward + backward on all crops (one pass per resolution), teacher forward on
    the global crops. No head, prototypes, loss, optimizer or EMA."""

    def __init__(self, ours: OurStep):
        self.ours = ours
        self.backbone_params = list(ours.model.student.backbone.parameters())

    def __call__(self, crops: Sequence[Tensor]) -> Tensor:
        ours, model = self.ours, self.ours.model
        if ours.compile_mode == "reduce-overhead" and ours.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()
        if ours.channels_last:
            crops = [x.contiguous(memory_format=torch.channels_last) for x in crops]
        with _autocast(ours.device, ours.precision):
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
                     device: torch.device, steps: int, repeats: int) -> dict:
    """Prototype logits + loss, forward and backward, alone: block logits from the permuted
    prototype matrix (ours) against full ``[N, K]`` logits gathered per view (the paper).

    Args:
        n_rows: N images per view; ``z`` is ``[V_s*N, D]`` with grad, ``w`` ``[V_t*N, D]``.

    Returns:
        milliseconds per pass (median over repeats) of ``block`` and ``gather`` and their ratio.
    """
    from .networks import Prototypes

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
        preds = [_blocks_by_gather(x, perm, block_size) for x in protos(z).chunk(n_student)]
        with torch.no_grad():
            targets = [_blocks_by_gather(x, perm, block_size) for x in protos(w).chunk(n_teacher)]
        baseline_loss(preds, targets).backward()

    paths = {"block": block, "gather": gather}
    for fn in paths.values():
        fn(None)
    times = {name: [] for name in paths}
    for r in range(repeats):
        for name in rotated(list(paths), r):
            times[name].append(time_steps(paths[name], [], steps, device))
    ms = {name: round(statistics.median(t) * 1000, 3) for name, t in times.items()}
    return {**{f"{k}_ms": v for k, v in ms.items()}, "gather_over_block": round(ms["gather"] / ms["block"], 3)}


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
    """Build the three steps, warm them up, time them alternately, and return the result.

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
    for name, value in (("--precision", precision), ("--baseline-precision", baseline_precision)):
        if value == "fp16" and device.type != "cuda":
            raise ValueError(f"{name} fp16 needs a CUDA device (got {device}); use bf16 or fp32")
    compile_mode = args.compile_mode if args.compile else None
    torch.manual_seed(args.seed)

    model = StudentTeacher(arch=args.arch, n_prototypes=args.prototypes, block_size=args.block_size,
                           global_crops=args.global_crops, hidden_dim=args.hidden_dim, embed_dim=args.embed_dim,
                           seed=args.seed)
    baseline_model = copy.deepcopy(model).to(device).train()  # same weights, same partition sequence
    model = model.to(device).train()
    ours = OurStep(model, precision, channels_last, compile_mode)
    steps = {"ours": ours, "baseline": BaselineStep(baseline_model, baseline_precision), "ceiling": CeilingStep(ours)}
    crops = synthetic_crops(args.batch_size, args.global_crops, args.global_size, args.local_crops,
                            args.local_size, device, seed=args.seed)

    log(f"bench-train: {args.arch}, {args.global_crops}x{args.global_size} + {args.local_crops}x{args.local_size} "
        f"crops, K={args.prototypes}, B={args.block_size}, batch {args.batch_size}, ours {precision}"
        f"{' channels_last' if channels_last else ''}{f' compile={compile_mode}' if compile_mode else ''}, "
        f"baseline {baseline_precision}, on {_device_name(device)}")
    warmup_s = {}
    for name, step in steps.items():
        start = time.perf_counter()
        for _ in range(args.warmup):
            step(crops)
        _synchronize(device)
        warmup_s[name] = round(time.perf_counter() - start, 2)
    log(f"warm-up seconds (compile included): {warmup_s}")

    host_syncs = None
    if device.type == "cuda" and args.sync_debug:
        # Every synchronizing CUDA call inside one of our steps becomes a warning; count them.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                ours(crops)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        host_syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
        log(f"host syncs in one of our steps: {len(host_syncs)}" + "".join(f"\n  {m}" for m in host_syncs))

    seconds = {name: [] for name in steps}
    peak = {name: 0.0 for name in steps}
    for r in range(args.repeats):
        for name in rotated(list(steps), r):  # alternate the order so drift hits all three
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            seconds[name].append(time_steps(steps[name], crops, args.steps, device))
            if device.type == "cuda":
                peak[name] = max(peak[name], torch.cuda.max_memory_allocated(device) / 2**20)
        log(f"repeat {r + 1}/{args.repeats}: " + ", ".join(
            f"{n} {args.batch_size / s[-1]:.2f} img/s" for n, s in seconds.items()))
    last_loss = ours(crops)  # after the clock: is our step still computing a finite loss?

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
        "host_syncs_per_step": None if host_syncs is None else len(host_syncs),
        "loss_finite": bool(torch.isfinite(last_loss).item()),
    }
    if device.type == "cuda":
        result |= {"peak_memory_mib": round(peak["ours"], 1), "baseline_peak_memory_mib": round(peak["baseline"], 1),
                   "ceiling_peak_memory_mib": round(peak["ceiling"], 1),
                   "peak_memory_kind": "cuda max_memory_allocated per measurement (includes the other "
                                       "measurement's resident weights and optimizer state)"}
    else:
        result |= {"peak_memory_mib": round(_peak_rss_mib(), 1),
                   "peak_memory_kind": "cpu peak RSS of the whole process (all three measurements)"}
    if args.logit_bench:
        n_rows = args.logit_batch_size or args.batch_size
        result["logit_path"] = {"batch_size": n_rows, **time_logit_paths(n_rows, len(crops), args.global_crops, args.embed_dim,
                                                args.prototypes, args.block_size, device, args.steps, args.repeats)}
    result |= {
        "arch": args.arch, "batch_size": args.batch_size, "global_crops": args.global_crops,
        "global_size": args.global_size, "local_crops": args.local_crops, "local_size": args.local_size,
        "prototypes": args.prototypes, "block_size": args.block_size, "precision": precision,
        "baseline_precision": baseline_precision, "channels_last": channels_last, "compile": compile_mode,
        "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "device": _device_name(device),
        "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
    }
    return result


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"cpu ({os.cpu_count()} cores, {platform.processor() or platform.machine()})"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="carp-fast bench-train", description=__doc__.splitlines()[0],
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
                   help="ours' memory format; default: on with CUDA or bf16, as the learner")
    p.add_argument("--compile", action="store_true", help="torch.compile ours' backbones, heads and loss")
    p.add_argument("--compile-mode", default="default", choices=["default", "reduce-overhead", "max-autotune"],
                   help="reduce-overhead records CUDA graphs (GPU only)")
    p.add_argument("--steps", type=int, default=20, help="timed steps per measurement and repeat")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps per measurement first (compile happens here)")
    p.add_argument("--repeats", type=int, default=3, help="alternations of the three measurements; the median is reported")
    p.add_argument("--logit-bench", action="store_true",
                   help="also time the prototype-logit + loss path alone: block logits vs [N, K] gather")
    p.add_argument("--logit-batch-size", type=int, default=None,
                   help="N per view for --logit-bench (default --batch-size): the path alone is cheap on a CPU "
                        "even at a GPU's per-device batch")
    p.add_argument("--sync-debug", action="store_true",
                   help="CUDA: count the host syncs in one of our steps (torch.cuda.set_sync_debug_mode('warn'))")
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
