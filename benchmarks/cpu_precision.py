"""Images/s of a CARP training step on the CPU: fp32 vs bf16 autocast, NCHW vs channels_last.

    python benchmarks/cpu_precision.py [--batch-size 256] [--repeats 3] [--steps 2] [--settings fp32,fp32+channels_last]
    ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/cpu_precision.py --settings fp32,fp32+channels_last

The second line has oneDNN use only AVX2, as on a CPU without AVX-512 (no bf16 units either).

The embedded default's model (resnet10_tiny, K = 1024, B = 64, head 512 -> 128, 2 x 28 px +
2 x 14 px crops) trained by carp_fast's Learner with all its callbacks
(:func:`benchmarks.bench_train.learner_step`) on one random in-memory batch. The four settings
are timed in rotating order in one process, so machine noise hits them alike; the median of
the repeats is printed. This is the measurement behind ``CARPConfig(precision="auto")`` choosing
bf16 + channels_last on CPUs with bf16 units.
"""

import argparse
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository's benchmarks/
from benchmarks.bench_train import learner_step, rotated, synthetic_crops  # noqa: E402
from carp_fast.carp import CARPConfig  # noqa: E402

SETTINGS = {  # name: (precision, channels_last)
    "fp32": ("fp32", False),
    "fp32+channels_last": ("fp32", True),
    "bf16": ("bf16", False),
    "bf16+channels_last": ("bf16", True),
}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="timed training steps per fit (after 1 untimed)")
    parser.add_argument("--settings", default=",".join(SETTINGS), help=f"comma-separated subset of {list(SETTINGS)}; the first is the base")
    args = parser.parse_args()
    chosen = args.settings.split(",")
    if not chosen or set(chosen) - set(SETTINGS):
        parser.error(f"--settings must name some of {list(SETTINGS)}, got {args.settings!r}")
    cpu = torch.device("cpu")
    crops = synthetic_crops(args.batch_size, 2, 28, 2, 14, cpu)
    steps = {}
    for name in chosen:
        precision, channels_last = SETTINGS[name]
        config = CARPConfig(arch="resnet10_tiny", n_prototypes=1024, block_size=64, hidden_dim=512, embed_dim=128,
                            optimizer="adamw", batch_size=args.batch_size, global_batch=args.batch_size,
                            precision=precision, channels_last=channels_last, sync_bn=False, log_every=10,
                            base_lr=2e-3, final_lr=2e-5)
        _, steps[name] = learner_step(config, crops, args.steps, warmup=1)
        steps[name]()  # warm-up: the Learner's set-up

    images_per_s = {name: [] for name in steps}
    for r in range(args.repeats):
        for name in rotated(list(steps), r):
            images_per_s[name].append(args.batch_size / steps[name]())
    base = statistics.median(images_per_s[chosen[0]])
    for name, values in images_per_s.items():
        median = statistics.median(values)
        print(f"{name:20s} {median:7.1f} img/s  x{median / base:4.2f} of {chosen[0]}   repeats {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
