"""Images/s of a CARP training step on the CPU: fp32 vs bf16 autocast, NCHW vs channels_last.

    python benchmarks/cpu_precision.py [--batch-size 256] [--repeats 3]

The embedded default's model (resnet10_tiny, K = 1024, B = 64, 2 x 28 px + 2 x 14 px crops,
AdamW) on random crops. The four settings are timed in rotating order in one process, so
machine noise hits them alike; the median of the repeats is printed. This is the measurement
behind CARPConfig.precision="auto" choosing bf16 + channels_last on CPUs with bf16 units.
"""

import argparse
import statistics
import time

import torch

from carp_fast.loss import carp_block_loss
from carp_fast.networks import StudentTeacher

SETTINGS = {"fp32": (False, False), "fp32+channels_last": (True, False), "bf16": (False, True), "bf16+channels_last": (True, True)}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=2, help="training steps per timing")
    args = parser.parse_args()
    torch.manual_seed(0)
    n = args.batch_size
    crops = [torch.randn(n, 3, 28, 28) for _ in range(2)] + [torch.randn(n, 3, 14, 14) for _ in range(2)]
    runs = {}
    for name, (channels_last, _) in SETTINGS.items():
        model = StudentTeacher("resnet10_tiny", 1024, 64, hidden_dim=512, embed_dim=128)
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        runs[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], 1e-3))

    def images_per_s(name):
        (channels_last, bf16), (model, opt) = SETTINGS[name], runs[name]
        xs = [c.contiguous(memory_format=torch.channels_last) for c in crops] if channels_last else crops
        start = time.perf_counter()
        for _ in range(args.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                out = model(*xs)
            loss = carp_block_loss(out.student, out.teacher).total
            opt.zero_grad()
            loss.backward()
            opt.step()
        return args.steps * n / (time.perf_counter() - start)

    names = list(SETTINGS)
    for name in names:
        images_per_s(name)  # warm-up
    results = {name: [] for name in names}
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            results[name].append(images_per_s(name))
    base = statistics.median(results["fp32"])
    for name, values in results.items():
        median = statistics.median(values)
        print(f"{name:20s} {median:7.1f} img/s  x{median / base:4.2f} of fp32   repeats {[round(v, 1) for v in values]}")


if __name__ == "__main__":
    main()
