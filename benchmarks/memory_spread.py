"""How spread the memory of a MaSSL or SOP run is: its targets, so its collapse shows here first.

    python benchmarks/memory_spread.py runs/tune/*/checkpoint.pth

For each checkpoint, the [CLS] memory (``memory.embeddings``, ``[K, D]``: the teacher's
embeddings of the last K images) as three numbers:

- the mean cosine between two different slots (1: every slot the same direction; about 0:
  spread over the sphere);
- the norm of the slots' mean (1: all alike; 0: balanced around the origin);
- the effective rank of the centred slots (Roy & Vetterli 2007): the exponential of the entropy
  of their normalised squared singular values; 1 for slots along one line, D for slots spread
  evenly over all D dimensions.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor


def spread(embeddings: Tensor) -> dict[str, float]:
    """``{"mean_cosine", "mean_norm", "effective_rank"}`` of ``embeddings`` ``[K, D]`` (rows
    normalised first), in float64."""
    x = F.normalize(embeddings.double(), dim=1)  # [K, D]
    k = x.shape[0]
    total = x.sum(0)  # sum_ij <x_i, x_j> = |sum_i x_i|^2, so no [K, K] matrix is built
    mean_cosine = (total.dot(total) - k) / (k * (k - 1))
    s2 = torch.linalg.svdvals(x - x.mean(0)) ** 2
    p = s2[s2 > 0] / s2.sum()
    return dict(mean_cosine=float(mean_cosine), mean_norm=float(x.mean(0).norm()),
                effective_rank=math.exp(float(-(p * p.log()).sum())))


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", type=Path, nargs="+", help="checkpoint.pth files of MaSSL or SOP runs")
    args = parser.parse_args(argv)
    rows = []
    print("| checkpoint | slots | mean cosine | norm of the mean | effective rank (centred) |")
    print("|---|---:|---:|---:|---:|")
    for path in args.checkpoints:
        if not path.is_file():
            parser.error(f"checkpoints: {path} is not a file")
        state = torch.load(path, map_location="cpu", weights_only=False)["model"]
        if "memory.embeddings" not in state:
            parser.error(f"checkpoints: {path} holds no memory (memory.embeddings): not a MaSSL or SOP run")
        memory = state["memory.embeddings"]
        row = dict(checkpoint=str(path), slots=memory.shape[0], **spread(memory))
        rows.append(row)
        print(f"| {path} | {row['slots']} | {row['mean_cosine']:.3f} | {row['mean_norm']:.3f} | {row['effective_rank']:.1f} |")
    return rows


if __name__ == "__main__":
    main()
