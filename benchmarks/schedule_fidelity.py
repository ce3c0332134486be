"""How far carp_fast's schedules are from the official code's, step by step (FIDELITY.md).

    python benchmarks/schedule_fidelity.py

Pure arithmetic, no training. The official loop (``main_carp.py``; MaSSL's is the same)
builds ``cosine_scheduler(base, final, epochs, micro_batches_per_epoch, warmup_epochs)``,
one entry per micro-batch, steps the optimizer at every ``A``-th micro-batch of an epoch
and at its last one (a short step when ``A`` does not divide the epoch), and reads entry
``it`` at the micro-batch that steps. carp_fast carries an unfinished accumulation into the
next epoch (every step averages ``A`` micro-batches) and reads the same cosine at the
stepping micro-batch of a run of ``S = micro-batches // A`` steps
(``carp_fast.callbacks.schedule.step_progress``); before issue 19 it read ``s / S``.

Prints one JSON object per setting: the steps of each run, the official short steps, and
the largest learning-rate difference between the two runs as a fraction of the peak, for
carp_fast now and before, pairing steps two ways: by position (the official step that takes
in the same micro-batch) and by count (the k-th step of each run).
"""

from __future__ import annotations

import json
import math

import numpy as np


def official_schedule(base: float, final: float, epochs: int, micro_batches: int, warmup_epochs: int = 0) -> np.ndarray:
    """The official ``cosine_scheduler`` (DINO's): ``[epochs * micro_batches]`` values."""
    warmup_iters = warmup_epochs * micro_batches
    warmup = np.linspace(0, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * micro_batches - warmup_iters)
    return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


def official_steps(epochs: int, micro_batches: int, accumulation: int) -> tuple[np.ndarray, int]:
    """The micro-batch index of each official optimizer step and the number of short (epoch-end) steps."""
    its, short = [], 0
    for epoch in range(epochs):
        for i in range(micro_batches):
            if (i + 1) % accumulation == 0 or i + 1 == micro_batches:
                its.append(epoch * micro_batches + i)
                short += (i + 1) % accumulation != 0
    return np.array(its), short


def carp_fast_step_lrs(base: float, final: float, epochs: int, micro_batches: int, accumulation: int,
                       warmup_epochs: int = 0, before: bool = False) -> np.ndarray:
    """The lr of each carp_fast optimizer step: the official function of the micro-batch index,
    read at ``(s + 1) A - 1`` of ``S A`` (now) or at ``s / S`` of the fit (before issue 19; its
    warm-up then rose linearly to the peak over ``W`` micro-batches, reaching it one after)."""
    steps = epochs * micro_batches // accumulation
    total = steps * accumulation
    warmup = min(warmup_epochs * micro_batches, total)
    lrs = []
    for s in range(steps):
        it = s / steps * total if before else (s + 1) * accumulation - 1  # the micro-batch index read
        if it < warmup:
            lrs.append(base * it / (warmup if before else max(warmup - 1, 1)))
        else:
            lrs.append(final + 0.5 * (base - final) * (1 + math.cos(math.pi * (it - warmup) / (total - warmup))))
    return np.array(lrs)


def compare(name: str, base: float, final: float, epochs: int, micro_batches: int, accumulation: int,
            warmup_epochs: int = 0) -> dict:
    schedule = official_schedule(base, final, epochs, micro_batches, warmup_epochs)
    official_its, short = official_steps(epochs, micro_batches, accumulation)
    official = schedule[official_its]
    result = {"setting": name, "epochs": epochs, "micro_batches_per_epoch": micro_batches, "accumulation": accumulation,
              "warmup_epochs": warmup_epochs, "official_steps": len(official), "official_short_steps": short}
    for label, before in (("now", False), ("before", True)):
        ours = carp_fast_step_lrs(base, final, epochs, micro_batches, accumulation, warmup_epochs, before)
        result["carp_fast_steps"] = len(ours)
        # By position: each carp_fast step against the official step that takes in the same
        # micro-batch (its last one), i.e. at the same point of the data.
        ours_its = (np.arange(len(ours)) + 1) * accumulation - 1
        same_data = official[np.minimum(np.searchsorted(official_its, ours_its), len(official) - 1)]
        result[f"max_lr_diff_over_peak_by_position_{label}"] = float(np.abs(ours - same_data).max() / base)
        # By count: the k-th step of each run (drifts apart by the official short steps).
        n = min(len(ours), len(official))
        result[f"max_lr_diff_over_peak_by_count_{label}"] = float(np.abs(ours[:n] - official[:n]).max() / base)
        result[f"first_step_lr_over_peak_{label}"] = float(ours[0] / base)
    result["official_first_step_lr_over_peak"] = float(official[0] / base)
    return result


SETTINGS = [
    # The paper's ImageNet run: 4 GPUs x 64, accumulation 16 (global batch 4096), 5,004 micro-batches per epoch and rank.
    dict(name="paper: ImageNet, 200 epochs, 4 x 64 x 16", base=0.6 * 4096 / 256, final=0.006, epochs=200,
         micro_batches=5004, accumulation=16),
    # The embedded default: batch 128 = global batch (no accumulation), 468 micro-batches per epoch, ~6 epochs in 9 minutes.
    dict(name="embedded default (recipes/fashion_mnist.py)", base=5e-3 * 128 / 256, final=2e-5, epochs=6,
         micro_batches=468, accumulation=1),
    # A short run with accumulation, as in the tests: 2 epochs of 10 micro-batches, 4 per step.
    dict(name="short run with accumulation", base=1.0, final=0.01, epochs=2, micro_batches=10, accumulation=4),
    # MaSSL ViT-B as published: 2 GPUs x 64 (no accumulation), 10,009 micro-batches per epoch, 10 warm-up epochs of 100.
    dict(name="MaSSL ViT-B: 100 epochs, 10 warm-up", base=7.5e-4 * 128 / 256, final=2e-6, epochs=100,
         micro_batches=10009, accumulation=1, warmup_epochs=10),
    # A short MaSSL warm-up: 1 of 3 epochs of 4 micro-batches (tests/test_numerics.py).
    dict(name="MaSSL, short warm-up", base=1.0, final=0.01, epochs=3, micro_batches=4, accumulation=1, warmup_epochs=1),
]


def main() -> None:
    for setting in SETTINGS:
        print(json.dumps(compare(**setting)))


if __name__ == "__main__":
    main()
