"""What SOP's own work costs beside the network: its share of a training step, on the CPU.

    python benchmarks/sop_cost.py                    # the embedded recipe, then the ImageNet shapes
    python benchmarks/sop_cost.py --rounds 3 --steps 5

SOP's own work is everything its step does that CARP's does not do with its prototypes: draw
the T tasks of anchors, search each anchor's neighbours in the memory (T x P anchors against
all K slots, exact, fp32), build the voting matrices, score the views against the supports,
the loss and its backward into the embeddings, and the memory write. It is timed by running
:class:`~carp_fast.sop.method.SOPStudentTeacher`'s own forward with the networks replaced by
stored embeddings of the right shape (``embed`` returns them), so nothing of the method is
re-implemented here.

1. **The embedded recipe** (``recipes/fashion_mnist_sop.py``'s settings and precision): SOP's
   work against the whole step of the real Learner with every callback
   (``benchmarks/method_speed.py``'s), measured in alternating rounds; the share is the median
   over rounds of the paired ratio. Issue 28's target: at most 10 %.
2. **The ImageNet recipe's shapes** (``recipes/in1k_sop.py``: K = 65,536, D = 256, T = 4, P = 64,
   P' = 32, k = 9, 128 images per GPU, 2 global crops; the [CLS] part; SOP-MIM's patch task is
   one task of 512 anchors with k = 1, no search): SOP's work and the neighbour search alone,
   timed on this CPU in fp32, with their floating-point operations. The A100 numbers printed
   beside them are **estimates** from those operations at the A100's fp32 peak (19.5 TFLOP/s),
   against a ViT-S/16 step estimated from its FLOPs at 40 % of the bf16 peak; no GPU measured them.

The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: make the repository's benchmarks/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import _device_name, learner_step  # noqa: E402
from benchmarks.bench_train import _synchronize as synchronize  # noqa: E402  (CUDA runs asynchronously)
from benchmarks.method_speed import method_setup  # noqa: E402

A100_FP32_FLOPS = 19.5e12  # dense fp32 peak (no TF32): the search runs in fp32
A100_BF16_FLOPS = 312e12  # dense bf16 peak
VIT_S16_FORWARD_FLOPS = 2 * 4.6e9  # 4.6 GMACs per 224 px image (timm)


def without_networks(model, n_images: int, n_student: int, n_teacher: int, dim: int):
    """``model`` with its student's and teacher's ``embed`` returning stored unit embeddings
    (``[n_student * N, D]`` with a gradient, ``[n_teacher * N, D]`` without): its forward then
    runs SOP's own work only. Returns the student's embedding leaf (its ``.grad`` is the
    backward's end)."""
    gen = torch.Generator().manual_seed(0)
    device = model.memory.embeddings.device
    z = F.normalize(torch.randn(n_student * n_images, dim, generator=gen), dim=1).to(device).requires_grad_()
    w = F.normalize(torch.randn(n_teacher * n_images, dim, generator=gen), dim=1).to(device)
    model.student.embed = lambda crops: z * 1.0  # a fresh graph node each call
    model.teacher.embed = lambda crops: w
    return z


def stand_in_backbone(drop_path: float) -> torch.nn.Module:
    """A backbone of no cost (its ``embed`` is replaced): only the memory and the head's width matter."""
    backbone = torch.nn.Identity()
    backbone.feature_dim = 8
    return backbone


def sop_work(model, loss_func, crops, precision_context) -> float:
    """Seconds of one step of SOP's own work: forward (tasks, search, votes, scores, memory
    write), loss and backward into the embeddings; on a GPU between two synchronisations."""
    device = model.memory.embeddings.device
    synchronize(device)
    start = time.perf_counter()
    with precision_context():
        out = model(*crops)
        loss = loss_func(out)
    loss.backward()
    synchronize(device)
    return time.perf_counter() - start


def autocast_for(config):
    """A context that runs what the recipe's precision runs (bf16 autocast on a CPU with bf16 units)."""
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(config.resolved_precision(torch.device("cpu")))
    return (lambda: torch.autocast("cpu", dtype=dtype)) if dtype else (lambda: torch.autocast("cpu", enabled=False))


def embedded(steps: int, warmup: int, rounds: int, batch_size: int | None = None, log=print) -> dict:
    """Part 1: SOP's work against the real Learner's step at the embedded recipe's settings
    (``batch_size`` overrides the recipe's)."""
    from carp_fast.sop import SOP
    from carp_fast.sop.method import build_model

    method, config, crops = method_setup("sop", batch_size)
    torch.manual_seed(0)
    _, full_step = learner_step(config, crops, steps, warmup, method=method)
    model = build_model(config).train()
    n_images, n_views = crops[0].shape[0], len(crops)
    without_networks(model, n_images, n_views, config.global_crops, config.embed_dim)
    loss_func = SOP.loss(config)
    context = autocast_for(config)
    flat = [c[:, :1, :1, :1] for c in crops]  # the crops' batch size is all the forward reads of them

    def work() -> float:
        for _ in range(warmup):
            sop_work(model, loss_func, flat, context)
        return statistics.fmean(sop_work(model, loss_func, flat, context) for _ in range(steps))

    step_s, work_s = [], []
    for r in range(rounds):
        for name in (("step", "sop") if r % 2 == 0 else ("sop", "step")):
            (step_s if name == "step" else work_s).append(full_step() if name == "step" else work())
        log(f"round {r}: step {step_s[-1] * 1000:.1f} ms, SOP's own work {work_s[-1] * 1000:.2f} ms")
    share = statistics.median(w / s for w, s in zip(work_s, step_s))
    return dict(batch=config.batch_size, crops=[tuple(c.shape[-2:]) for c in crops], memory=config.memory_size,
                tasks=config.tasks, anchors=config.block_size, sops=config.sops, neighbours=config.neighbours,
                precision=config.precision, step_ms=round(statistics.median(step_s) * 1000, 1),
                sop_ms=round(statistics.median(work_s) * 1000, 2), sop_share=round(share, 4))


def imagenet_shapes(steps: int, warmup: int, log=print, device: torch.device | str = "cpu") -> dict:
    """Part 2: SOP's work and the search alone at the ImageNet recipe's shapes, fp32 on
    ``device`` (this CPU by default; ``benchmarks/gpu_check.py`` runs it on its GPU), with FLOP
    counts and (estimates) A100 times."""
    from carp_fast.sop.method import SOPStudentTeacher
    from carp_fast.sop.loss import SOPLoss
    from carp_fast.sop.prototypes import nearest_neighbours

    device = torch.device(device)
    n_images, n_global, memory, dim, tasks, anchors, sops, k = 128, 2, 65536, 256, 4, 64, 32, 9
    model = SOPStudentTeacher(stand_in_backbone, memory_size=memory, tasks=tasks, anchors=anchors, sops=sops, neighbours=k,
                              hidden_dim=16, embed_dim=dim, mim=False).to(device).train()
    without_networks(model, n_images, n_global, n_global, dim)
    crops = [torch.zeros(n_images, 1, 1, 1, device=device)] * n_global
    loss_func = SOPLoss()
    off = lambda: torch.autocast(device.type, enabled=False)  # noqa: E731
    for _ in range(warmup):
        sop_work(model, loss_func, crops, off)
    work = statistics.median(sop_work(model, loss_func, crops, off) for _ in range(steps))
    table = model.memory.embeddings
    drawn = model.anchor_sampler(device)
    for _ in range(warmup):
        nearest_neighbours(table, drawn, k - 1)
    search = []
    for _ in range(steps):
        synchronize(device)
        start = time.perf_counter()
        nearest_neighbours(table, drawn, k - 1)
        synchronize(device)
        search.append(time.perf_counter() - start)
    search_s = statistics.median(search)
    search_flops = 2 * tasks * anchors * memory * dim  # [T*P, D] x [D, K]
    supports = tasks * sops * k
    score_flops = 3 * 2 * (2 * n_global) * n_images * supports * dim  # student (fwd + 2 bwd) and teacher cosines
    step_flops = n_images * n_global * (3 + 1) * VIT_S16_FORWARD_FLOPS  # student fwd + bwd, teacher fwd, per GPU
    estimate_sop_ms = (search_flops + score_flops) / A100_FP32_FLOPS * 1000
    estimate_step_ms = step_flops / (0.4 * A100_BF16_FLOPS) * 1000
    where = "this CPU" if device.type == "cpu" else str(device)
    log(f"ImageNet shapes on {where} (fp32): SOP's work {work * 1000:.1f} ms, of which the search {search_s * 1000:.1f} ms")
    return dict(device=device.type, memory=memory, dim=dim, tasks=tasks, anchors=anchors, sops=sops, neighbours=k, images_per_gpu=n_images,
                sop_ms=round(work * 1000, 1), search_ms=round(search_s * 1000, 1),
                search_gflop=round(search_flops / 1e9, 2), scores_gflop=round(score_flops / 1e9, 2),
                search_gflops=round(search_flops / search_s / 1e9, 1),
                a100_sop_ms_estimate=round(estimate_sop_ms, 2), a100_vit_s16_step_ms_estimate=round(estimate_step_ms, 1),
                a100_share_estimate=round(estimate_sop_ms / (estimate_sop_ms + estimate_step_ms), 4))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, in every measurement (>= 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the step and SOP's work")
    parser.add_argument("--skip-imagenet", action="store_true", help="part 1 only")
    args = parser.parse_args(argv)
    if args.warmup < 1 or args.steps < 1 or args.rounds < 1:
        parser.error("--steps, --warmup and --rounds must be >= 1 (the step's clock starts after a warm-up step)")
    result = {"device": _device_name(torch.device("cpu")), "threads": torch.get_num_threads(),
              "embedded": embedded(args.steps, args.warmup, args.rounds)}
    if not args.skip_imagenet:
        result["imagenet_shapes"] = imagenet_shapes(args.steps, args.warmup)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
