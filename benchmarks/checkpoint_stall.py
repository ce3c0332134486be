"""How long a step checkpoint stalls training, and how large it is.

    .venv/bin/python benchmarks/checkpoint_stall.py            # embedded recipe + paper ResNet-50

For each configuration a CARP learner takes two optimizer steps on random 32 px crops (so the
optimizer holds its state), then ``save_checkpoint`` (what the ``Preemption`` callback and the
``Checkpointer`` call: gather the random states, check every tensor is finite, write, fsync,
rename, rotate) is timed ``--repeats`` times into ``--dir``. Training waits for all of it: the
save runs on the training thread. Prints one line per configuration: size in MB and seconds
(median and max).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from carp_fast.carp import CARPConfig, carp_learner  # noqa: E402
from carp_fast.checkpoint import save_checkpoint  # noqa: E402
from carp_fast.recipes.fashion_mnist import DEFAULTS as EMBEDDED  # noqa: E402

CONFIGS = {
    # The embedded recipe's network and optimizer.
    "embedded (resnet10_tiny, K=1024, AdamW)": CARPConfig(
        **{k: EMBEDDED[k] for k in ("arch", "n_prototypes", "block_size", "hidden_dim", "embed_dim", "optimizer",
                                    "base_lr", "final_lr", "weight_decay", "teacher_momentum")},
        batch_size=4, global_batch=4, precision="fp32", log_every=1),
    # The paper's: ResNet-50, K = 65,536, LARS.
    "paper (resnet50, K=65536, LARS)": CARPConfig(batch_size=4, global_batch=4, precision="fp32", log_every=1),
}


def tiny_dls(n_images: int = 8, size: int = 32):
    from fastai.data.core import DataLoaders
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    views = [torch.randn(n_images, 3, size, size, generator=g) for _ in range(2)]
    data = TensorDataset(*views, torch.zeros(n_images, dtype=torch.long))
    empty = TensorDataset(*(t[:0] for t in data.tensors))  # no validation
    return DataLoaders(DataLoader(data, batch_size=4, drop_last=True), DataLoader(empty, batch_size=4))


def measure(config: CARPConfig, folder: Path, repeats: int) -> tuple[float, list[float]]:
    learn = carp_learner(tiny_dls(), config, progress=False)
    learn.fit(1)  # two optimizer steps: the optimizer state exists
    path = folder / "checkpoint.pth"
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        save_checkpoint(learn, path, next_epoch=1, settings={}, batch=0)
        seconds.append(time.perf_counter() - start)
    return path.stat().st_size / 1e6, seconds


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder under runs/)")
    args = parser.parse_args(argv)
    root = Path(args.dir) if args.dir else Path("runs")
    root.mkdir(parents=True, exist_ok=True)
    for name, config in CONFIGS.items():
        with tempfile.TemporaryDirectory(dir=root) as folder:
            size, seconds = measure(config, Path(folder), args.repeats)
        print(f"{name}: {size:.1f} MB, save {statistics.median(seconds):.2f} s median, {max(seconds):.2f} s max "
              f"({args.repeats} saves)", flush=True)


if __name__ == "__main__":
    main()
