"""One-shot GPU check (issue 21): everything a first GPU should measure, in one command.

    python benchmarks/gpu_check.py                      # one GPU, at most about 8 minutes
    python benchmarks/gpu_check.py --dry-run            # the same code on the CPU at tiny sizes

Prints a rich table, then one JSON line (the last line) with:

- ``device``, ``torch_cuda`` (torch's CUDA build), ``driver`` (nvidia-smi), ``dali``;
- ``dali_gpu_images_per_s`` / ``dali_cpu_images_per_s``: the 2x224 + 6x96 multi-crop DALI
  pipeline on a generated JPEG folder (``pipelines/make_jpeg_folder.py``), nvJPEG 'mixed'
  decode against CPU decode, each in its own subprocess (``pipelines/bench.py``; DALI's CUDA
  12 build is never loaded beside torch's CUDA in this process);
- ``train_images_per_s``, ``ceiling_images_per_s``, ``train_over_ceiling`` and
  ``host_syncs_per_step``: ``benchmarks/bench_train.py``'s ``run`` (the real ``learn.fit``
  against the backbone-only step, ResNet-50, bf16, channels_last, the recipe's crops and
  per-GPU batch 64; host syncs from ``torch.cuda.set_sync_debug_mode("warn")``);
- ``peak_memory_mib``: ``torch.cuda.max_memory_allocated`` of ``learn.fit`` at per-GPU batch
  64 and 128;
- ``in1k_mc``: a 2-minute ``recipes/in1k_mc.py`` run on the generated folder (its summary,
  the exported backbone and its round-trip check);
- ``batchnorm``: the backbone step with ``nn.BatchNorm2d``, torch's SyncBatchNorm (its
  masked path) and carp_fast's ``GlobalBatchNorm`` (``benchmarks/batchnorm_step.py``), and
  the largest difference between each fused CUDA kernel and the CPU formula;
- ``sop_work``: SOP's own work (anchors, the exact neighbour search over 65,536 slots, votes,
  scores, loss and backward, memory write) at the ImageNet recipe's shapes, fp32
  (``benchmarks/sop_cost.py``'s ``imagenet_shapes``; on the CPU in the dry run);
- ``estimates``: what the CPU can compute before a GPU (:func:`estimates`): FLOPs per image,
  the resulting images/s ceilings at an A100's and an H200's bf16 peak, and the peak memory
  of one micro-batch at batch 64 and 128 without allocating.

Each measurement runs in its own try/except: a failure records ``"error: ..."`` under its name
(in ``errors``) and the rest still run. ``--dry-run`` uses resnet10_tiny, 32/16 px crops and a
few steps on the CPU; the GPU-only fields are null there.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository's benchmarks/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import bench_train  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
A100_BF16_TFLOPS = 312.0  # dense, no sparsity (NVIDIA A100 datasheet)
H200_BF16_TFLOPS = 989.0  # dense, no sparsity (NVIDIA H200 datasheet)
UTILISATION = 0.40  # stated utilisation for the ceilings (ResNet-50 training rarely exceeds ~40-50 %)

# The main recipe (recipes/in1k_mc.py) and the dry run's tiny stand-in.
FULL = dict(arch="resnet50", global_size=224, local_size=96, global_crops=2, local_crops=6, batch_size=64,
            prototypes=65536, block_size=512, steps=10, warmup=3, repeats=2, images=(4, 256), val=(4, 25),
            data_seconds=20.0, workers=8, minutes="2", train_images=1024)
TINY = dict(arch="resnet10_tiny", global_size=32, local_size=16, global_crops=2, local_crops=6, batch_size=4,
            prototypes=256, block_size=64, steps=2, warmup=1, repeats=1, images=(2, 4), val=(2, 2),
            data_seconds=1.0, workers=1, minutes=None, train_images=8)


# ----------------------------------------------------------------------------- environment

def environment() -> dict:
    cuda = torch.cuda.is_available()
    driver = None
    if shutil.which("nvidia-smi"):
        try:
            driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True, timeout=30).stdout.strip().splitlines()[0] or None
        except Exception:  # noqa: BLE001 - a missing or broken nvidia-smi is a null driver
            driver = None
    try:
        from importlib.metadata import version

        dali = next((version(n) for n in ("nvidia-dali-cuda120", "nvidia-dali-cuda130", "nvidia-dali-cuda110")
                     if _installed(n)), None)
    except Exception:  # noqa: BLE001
        dali = None
    return {"device": f"cuda {torch.cuda.get_device_name()}" if cuda else bench_train._device_name(torch.device("cpu")),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda, "driver": driver, "dali": dali,
            "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else []}


def _installed(name: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(name)
        return True
    except PackageNotFoundError:
        return False


# ----------------------------------------------------------------------------- estimates (CPU, no allocation)

def flops_per_image(arch: str = "resnet50", global_size: int = 224, local_size: int = 96, global_crops: int = 2,
                    local_crops: int = 6) -> dict:
    """FLOPs of one image of the multi-crop recipe, counted by ``torch.utils.flop_counter.FlopCounterMode``
    on fake tensors (shapes only, nothing computed or allocated).

    Counted: the backbone's convolutions and matmuls (FlopCounterMode counts conv, mm/addmm/bmm
    and attention, 2 FLOPs per multiply-add; BatchNorm, ReLU, pooling and adds are not
    counted): student forward + backward on every crop, teacher forward on the global crops.
    The projection head, the prototype logits, the loss and the optimizer are not counted.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from carp_fast.backbones import build_backbone

    with FakeTensorMode():
        net = build_backbone(arch).train()
        crops = {global_size: global_crops, local_size: local_crops}
        fwd, bwd = {}, {}
        for size, count in crops.items():
            x = torch.randn(1, 3, size, size)
            with FlopCounterMode(display=False) as f:
                y = net(x).sum()
            fwd[size] = f.get_total_flops()
            with FlopCounterMode(display=False) as b:
                y.backward()
            bwd[size] = b.get_total_flops()
            net.zero_grad(set_to_none=True)
    student_fwd = sum(fwd[s] * n for s, n in crops.items())
    student_bwd = sum(bwd[s] * n for s, n in crops.items())
    teacher_fwd = fwd[global_size] * global_crops
    total = student_fwd + student_bwd + teacher_fwd
    return {"arch": arch, "forward_gflop_per_crop": {str(s): round(v / 1e9, 3) for s, v in fwd.items()},
            "backward_over_forward": round(student_bwd / student_fwd, 3),
            "student_forward_gflop": round(student_fwd / 1e9, 3), "student_backward_gflop": round(student_bwd / 1e9, 3),
            "teacher_forward_gflop": round(teacher_fwd / 1e9, 3), "gflop_per_image": round(total / 1e9, 3),
            "supervised_224_equivalents": round(total / (3 * fwd[global_size]), 2),
            "counted": "backbone conv/matmul FLOPs (2 per multiply-add, torch FlopCounterMode on fake tensors): "
                       "student fwd+bwd on all crops (no input-gradient for the images), teacher fwd on the globals; "
                       "head, prototypes, loss, BatchNorm/ReLU/pooling and optimizer not counted"}


class _LiveBytes:
    """A TorchDispatchMode that follows the bytes of every live tensor storage (fake ones
    too) and keeps the peak: each op's outputs are added, storages that died are removed."""

    def __new__(cls):
        from torch.multiprocessing.reductions import StorageWeakRef
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_flatten

        class LiveBytes(TorchDispatchMode):
            def __init__(self):
                super().__init__()
                self.live, self.now, self.peak = {}, 0, 0

            def add(self, t):
                if not isinstance(t, torch.Tensor):
                    return
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self.live:
                    self.live[ref.cdata] = (ref, storage.nbytes())
                    self.now += storage.nbytes()
                    self.peak = max(self.peak, self.now)

            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for key in [k for k, (r, _) in self.live.items() if r.expired()]:
                    self.now -= self.live.pop(key)[1]
                for t in tree_flatten(out)[0]:
                    self.add(t)
                return out

        return LiveBytes()


def micro_batch_memory(batch_size: int, arch: str = "resnet50", global_size: int = 224, local_size: int = 96,
                       global_crops: int = 2, local_crops: int = 6, n_prototypes: int = 65536, embed_dim: int = 256) -> dict:
    """Peak bytes of one micro-batch, traced on fake tensors (nothing allocated): two backbones
    (student with gradients and SGD-momentum state as LARS keeps, teacher frozen), the student's
    forward on all crops in bf16 autocast (one pass per resolution), the teacher's forward on the
    globals, backward and an optimizer step, every live storage followed by :class:`_LiveBytes`.

    An estimate: autocast runs on the CPU here (the same bf16 casts as CUDA; cuDNN may keep
    other saved tensors), and the CUDA caching allocator's rounding and fragmentation, cuDNN
    workspaces, the CUDA context (~0.5 GiB) and DALI's buffers are not included. The head and
    prototypes are added analytically (``head_prototypes_mib``: fp32 prototypes ``[K, D]`` with
    gradient and momentum, and ``[views x N, K]`` fp32 student logits, their softmax and
    gradient, plus the teacher's ``[globals x N, K]`` targets).
    """
    from torch._subclasses.fake_tensor import FakeTensorMode

    from carp_fast.backbones import build_backbone

    mib = 2**20
    with FakeTensorMode():
        student, teacher = build_backbone(arch).train(), build_backbone(arch).train()
        for p in teacher.parameters():
            p.requires_grad_(False)
        opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
        cl = torch.channels_last
        globals_ = torch.randn(global_crops * batch_size, 3, global_size, global_size).contiguous(memory_format=cl)
        locals_ = torch.randn(local_crops * batch_size, 3, local_size, local_size).contiguous(memory_format=cl)
        tracker = _LiveBytes()
        for t in [*student.parameters(), *student.buffers(), *teacher.parameters(), *teacher.buffers(), globals_, locals_]:
            tracker.add(t)
        static = tracker.now
        with tracker:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                total = student(globals_).float().sum() + (student(locals_).float().sum() if local_crops else 0)
                with torch.no_grad():
                    teacher(globals_)
            after_forward = tracker.now
            total.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    views, k = global_crops + local_crops, n_prototypes
    head = (3 * k * embed_dim * 4 + 3 * views * batch_size * k * 4 + global_crops * batch_size * k * 4) / mib
    backbone = tracker.peak / mib
    return {"batch_size": batch_size, "backbone_peak_mib": round(backbone), "static_mib": round(static / mib),
            "after_forward_mib": round(after_forward / mib), "head_prototypes_mib": round(head),
            "estimate_mib": round(backbone + head), "estimate": True}


def estimates(utilisation: float = UTILISATION) -> dict:
    """The CPU-computable numbers for the main recipe (ResNet-50, 2x224 + 6x96, bf16)."""
    flops = flops_per_image()
    per_image = flops["gflop_per_image"] * 1e9
    ceilings = {name: round(utilisation * tflops * 1e12 / per_image)
                for name, tflops in (("a100", A100_BF16_TFLOPS), ("h200", H200_BF16_TFLOPS))}
    return {"flops": flops, "utilisation": utilisation,
            "peak_tflops_bf16_dense": {"a100": A100_BF16_TFLOPS, "h200": H200_BF16_TFLOPS},
            "ceiling_images_per_s": ceilings,
            "memory": {str(b): micro_batch_memory(b) for b in (64, 128)}}


# ----------------------------------------------------------------------------- measurements

def make_folder(root: Path, sizes: dict) -> Path:
    from carp_fast.pipelines.make_jpeg_folder import make_jpeg_folder

    (classes, per_class), (vclasses, vper_class) = sizes["images"], sizes["val"]
    make_jpeg_folder(root / "train", classes=classes, per_class=per_class, seed=0)
    make_jpeg_folder(root / "val", classes=vclasses, per_class=vper_class, seed=1)
    return root


def data_speed(folder: Path, sizes: dict, backend: str, device: str, timeout: float) -> float:
    """Images/s of ``pipelines/bench.py`` in a subprocess (its last line is JSON)."""
    cmd = [sys.executable, "-m", "carp_fast.pipelines.bench", "--data", str(folder / "train"), "--backend", backend,
           "--device", device, "--batch-size", str(sizes["batch_size"]), "--workers", str(sizes["workers"]),
           "--seconds", str(sizes["data_seconds"]), "--warmup", "2", "--global-size", str(sizes["global_size"]),
           "--local-size", str(sizes["local_size"]), "--local-crops", str(sizes["local_crops"])]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if out.returncode != 0:
        raise RuntimeError(f"exit {out.returncode}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else ''}")
    return json.loads(out.stdout.strip().splitlines()[-1])["images_per_s"]


def train_speed(sizes: dict, device: torch.device) -> dict:
    """bench_train.run: ours (learn.fit) against the backbone-only ceiling, with host syncs on CUDA."""
    argv = ["--arch", sizes["arch"], "--global-size", str(sizes["global_size"]), "--local-size", str(sizes["local_size"]),
            "--global-crops", str(sizes["global_crops"]), "--local-crops", str(sizes["local_crops"]),
            "--prototypes", str(sizes["prototypes"]), "--block-size", str(sizes["block_size"]),
            "--batch-size", str(sizes["batch_size"]), "--steps", str(sizes["steps"]), "--warmup", str(sizes["warmup"]),
            "--repeats", str(sizes["repeats"]), "--device", device.type, "--precision", "bf16", "--channels-last"]
    if device.type == "cuda":
        argv += ["--sync-debug", "--baseline-precision", "bf16"]
    args = bench_train.build_parser().parse_args(argv)
    return bench_train.run(args, log=lambda line: print(line, file=sys.stderr, flush=True))


def fit_peak_memory(sizes: dict, batch_size: int, device: torch.device) -> float | None:
    """``torch.cuda.max_memory_allocated`` (MiB) over one ``learn.fit`` at ``batch_size`` (None on the CPU)."""
    from carp_fast.carp import CARPConfig

    config = CARPConfig(arch=sizes["arch"], n_prototypes=sizes["prototypes"], block_size=sizes["block_size"],
                        global_crops=sizes["global_crops"], batch_size=batch_size, global_batch=batch_size,
                        precision="bf16", channels_last=True, sync_bn=False, final_lr=0.0)
    crops = bench_train.synthetic_crops(batch_size, sizes["global_crops"], sizes["global_size"], sizes["local_crops"],
                                        sizes["local_size"], device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    learn, step = bench_train.learner_step(config, crops, steps=2, warmup=1)
    step()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    del learn, crops
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return None if peak is None else round(peak, 1)


def recipe_run(folder: Path, out: Path, sizes: dict, dry_run: bool, timeout: float) -> dict:
    """``recipes/in1k_mc.py`` as launched (a subprocess): train, k-NN, export with its round-trip check."""
    cmd = [sys.executable, "recipes/in1k_mc.py", "--data", str(folder), "--out", str(out),
           "--train-images", str(sizes["train_images"]), "--workers", str(sizes["workers"]), "--no-progress",
           "--no-knn-random-init"]
    if dry_run:
        cmd += ["--arch", "resnet10_tiny", "--global-size", str(sizes["global_size"]),
                "--local-size", str(sizes["local_size"]), "--eval-size", str(sizes["global_size"]),
                "--eval-resize", str(sizes["global_size"] + 4), "--n-prototypes", str(sizes["prototypes"]),
                "--block-size", str(sizes["block_size"]), "--batch-size", "2", "--global-batch", "4",
                "--epochs", "1", "--backend", "torchvision", "--knn-bank", "8", "--knn-queries", "4"]
        if _recipe_has_device_option():  # issue 21's explicit CPU choice, where the recipe has it
            cmd += ["--device", "cpu"]
    else:
        # The recipe's per-GPU batch 64 without accumulation (one GPU), DALI as the recipe picks it.
        cmd += ["--minutes", sizes["minutes"], "--global-batch", "64", "--knn-bank", "64", "--knn-queries", "32"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    seconds = round(time.perf_counter() - start, 1)
    if done.returncode != 0:
        tail = (done.stdout + done.stderr).strip().splitlines()[-3:]
        raise RuntimeError(f"exit {done.returncode} after {seconds} s: {' | '.join(tail)}")
    summary = json.loads((out / "summary.json").read_text())
    backbone = Path(summary["backbone"])
    return {"seconds": seconds, "steps_run": summary.get("steps_run"), "epochs_run": summary.get("epochs_run"),
            "knn_top1": summary.get("knn_top1"),
            "export_checked": backbone.exists() and backbone.with_suffix(".safetensors").exists(),
            "command": " ".join(cmd[1:])}


def _recipe_has_device_option() -> bool:
    import dataclasses

    from carp_fast.run import TrainSettings

    return "device" in {f.name for f in dataclasses.fields(TrainSettings)}


def batchnorm_times(sizes: dict, device: torch.device) -> tuple[dict, str]:
    """The backbone step with ``nn.BatchNorm2d``, torch's SyncBatchNorm (CUDA) and carp_fast's
    GlobalBatchNorm (``benchmarks/batchnorm_step.py``), and on a GPU how far each fused kernel
    is from the CPU formula of ``carp_fast/sync_bn.py``."""
    from benchmarks import batchnorm_step

    crops = [sizes["global_size"]] * sizes["global_crops"] + [sizes["local_size"]] * sizes["local_crops"]
    times = batchnorm_step.step_times(sizes["arch"], crops, sizes["batch_size"], device, "bf16",
                                      steps=sizes["steps"], rounds=sizes["repeats"], warmup=sizes["warmup"])
    if device.type == "cuda":
        times["cuda_vs_cpu_max_abs_diff"] = batchnorm_step.kernel_agreement(device)
    return times, "one process in a group of one: the collectives run, the time between processes is not measured"


# ----------------------------------------------------------------------------- the check

def sop_work(device: torch.device, steps: int) -> dict:
    """SOP's own work at the ImageNet recipe's shapes on ``device`` (``benchmarks/sop_cost.py``):
    what BENCHMARKS.md has only as an A100 estimate from FLOPs."""
    from benchmarks import sop_cost

    return sop_cost.imagenet_shapes(steps=steps, warmup=2, log=lambda _: None, device=device)


def check(dry_run: bool, work: Path, log=print) -> dict:
    started = time.perf_counter()
    sizes = TINY if dry_run else FULL
    device = torch.device("cpu" if dry_run or not torch.cuda.is_available() else "cuda")
    gpu = device.type == "cuda"
    result: dict = {"dry_run": dry_run, "errors": {}, "notes": {}}
    result |= environment()
    if gpu:
        torch.backends.cudnn.benchmark = True

    def measure(name, fn):
        t = time.perf_counter()
        try:
            value = fn()
        except Exception as err:  # noqa: BLE001 - one failure must not stop the others
            result["errors"][name] = f"error: {type(err).__name__}: {err}"
            log(f"[{name}] failed: {traceback.format_exc(limit=3)}")
            value = None
        log(f"[{name}] {time.perf_counter() - t:.1f} s")
        return value

    result["estimates"] = measure("estimates", estimates)
    folder = measure("jpeg_folder", lambda: make_folder(work / "jpegs", sizes))

    # Input pipeline: DALI mixed vs CPU decode on a GPU; the dry run exercises the same path with torchvision.
    if gpu:
        result["dali_gpu_images_per_s"] = measure("dali_gpu", lambda: data_speed(folder, sizes, "dali", "cuda", 120))
        result["dali_cpu_images_per_s"] = measure("dali_cpu", lambda: data_speed(folder, sizes, "dali", "cpu", 120))
        result["torchvision_images_per_s"] = None
    else:
        result["dali_gpu_images_per_s"] = result["dali_cpu_images_per_s"] = None
        result["torchvision_images_per_s"] = measure("torchvision_data",
                                                     lambda: data_speed(folder, sizes, "torchvision", "cpu", 120))

    train = measure("train", lambda: train_speed(sizes, device)) or {}
    result["train_images_per_s"] = train.get("images_per_s")
    result["ceiling_images_per_s"] = train.get("ceiling_images_per_s")
    result["train_over_ceiling"] = train.get("ours_over_ceiling")
    result["baseline_images_per_s"] = train.get("baseline_images_per_s")
    result["host_syncs_per_step"] = train.get("host_syncs_per_step") if gpu else None

    peaks = {}
    for b in ((64, 128) if gpu else (sizes["batch_size"], 2 * sizes["batch_size"])):
        peaks[str(b)] = measure(f"peak_memory_{b}", lambda b=b: fit_peak_memory(sizes, b, device))
    result["peak_memory_mib"] = peaks if gpu else None

    result["in1k_mc"] = measure("in1k_mc", lambda: recipe_run(folder, work / "in1k_mc", sizes, dry_run,
                                                             timeout=240 if gpu else 300))
    bn = measure("batchnorm", lambda: batchnorm_times(sizes, device))
    result["batchnorm"], result["notes"]["batchnorm"] = bn if bn else (None, "failed")
    result["sop_work"] = measure("sop_work", lambda: sop_work(device, steps=5 if gpu else 1))
    result["seconds"] = round(time.perf_counter() - started, 1)
    return result


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"gpu_check{' --dry-run (CPU, tiny sizes)' if result['dry_run'] else ''}: {result['device']}")
    table.add_column("measurement")
    table.add_column("value", overflow="fold")
    est = result.get("estimates") or {}
    rows = [(k, result.get(k)) for k in ("torch", "torch_cuda", "driver", "dali", "dali_gpu_images_per_s",
                                         "dali_cpu_images_per_s", "torchvision_images_per_s", "train_images_per_s",
                                         "ceiling_images_per_s", "train_over_ceiling", "baseline_images_per_s",
                                         "host_syncs_per_step", "peak_memory_mib", "in1k_mc", "batchnorm", "sop_work")]
    if est:
        rows += [("estimate: GFLOP per image (ResNet-50 2x224+6x96)", est["flops"]["gflop_per_image"]),
                 ("estimate: backward / forward", est["flops"]["backward_over_forward"]),
                 (f"estimate: ceiling img/s at {est['utilisation']:.0%} of bf16 peak", est["ceiling_images_per_s"]),
                 ("estimate: micro-batch peak MiB (batch 64 / 128)",
                  {b: m["estimate_mib"] for b, m in est["memory"].items()})]
    rows += [(f"error: {k}", v) for k, v in result["errors"].items()]
    rows += [(f"note: {k}", v) for k, v in result["notes"].items()]
    rows.append(("seconds", result.get("seconds")))
    for name, value in rows:
        table.add_row(name, "null" if value is None else json.dumps(value) if isinstance(value, (dict, list)) else str(value))
    Console(width=160).print(table)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="benchmarks/gpu_check.py", description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="the same code on the CPU at tiny sizes (GPU-only fields null)")
    parser.add_argument("--work", default=None, help="folder for the generated JPEGs and the recipe run (default: a temporary one)")
    parser.add_argument("--estimates-only", action="store_true", help="print only the CPU estimates (JSON)")
    args = parser.parse_args(argv)
    if args.estimates_only:
        result = estimates()
        print(json.dumps(result), flush=True)
        return result
    if not args.dry_run and not torch.cuda.is_available():
        parser.error("no CUDA device: run on a GPU, or use --dry-run")
    with tempfile.TemporaryDirectory(prefix="gpu_check_") as tmp:
        work = Path(args.work) if args.work else Path(tmp)
        result = check(args.dry_run, work, log=lambda line: print(line, file=sys.stderr, flush=True))
    result |= {"python": platform.python_version(), "cpus": os.cpu_count()}
    print_table(result)
    print(json.dumps(result), flush=True)
    return result


if __name__ == "__main__":
    main()
