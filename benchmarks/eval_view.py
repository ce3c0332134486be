"""The embedded default's k-NN at several evaluation sizes: raw pixels and trained teachers.

    python benchmarks/eval_view.py --sizes 28 22 20 18 16 --checkpoints runs/tune/*/checkpoint.pth
    python benchmarks/eval_view.py --eval-on validation --checkpoints ...   # runs trained with --eval-on validation

Networks trained on small random-resized crops see objects smaller than the whole test image
shows them (the train-test resolution discrepancy of FixRes, Touvron et al. 2019), so the size
the test images are shrunk to changes the k-NN. This prints, for each size, the k-NN top-1
(k = 20, T = 0.07) of the raw pixels and of each checkpoint's teacher, on exactly the recipe's
bank (20k training images, its seed) and queries (the 10k test images; ``--eval-on
validation``: the 10k held-out training images, against a bank drawn from the other 50k): the
numbers the recipe prints for its own ``--eval-size``. Size 28 is the images as they are; the
others shrink the whole image (``resize = size``). A checkpoint is refused on the validation
split unless its run held those images out of pretraining (``--eval-on validation``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from rich.console import Console
from rich.table import Table

from carp_fast.eval.checkpoints import load_backbone
from carp_fast.eval.knn import loader_knn
from carp_fast.eval.pixels import raw_pixel_knn
from carp_fast.pipelines import eval_loader
from carp_fast.recipes.fashion_mnist import DEFAULTS
from carp_fast.run import open_sources, parse_settings


def _held_out_by(path: Path) -> str:
    """The ``--eval-on`` of the run that wrote checkpoint ``path`` (``test`` before the option existed)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=False).get("settings", {}).get("eval_on", "test")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[28, 22, 20, 18, 16], help="evaluation sizes (px)")
    parser.add_argument("--checkpoints", type=Path, nargs="*", default=[], help="recipe checkpoints (teacher evaluated)")
    parser.add_argument("--eval-on", choices=("test", "validation"), default="test",
                        help="the queries: the test split, or the 10k held-out training images (choose the size there)")
    args = parser.parse_args()
    for path in args.checkpoints:
        if not path.is_file():
            parser.error(f"--checkpoints: no file {path}")
        if args.eval_on == "validation" and _held_out_by(path) != "validation":
            parser.error(f"--checkpoints: {path} was pretrained on the validation images (its run's --eval-on was not "
                         "validation); train it with --eval-on validation")

    settings, config = parse_settings(DEFAULTS, ["--out", "runs/eval_view", "--eval-on", args.eval_on], __doc__)
    sources = open_sources(settings, config)  # the recipe's bank and queries, its seeds
    table = Table(title="k-NN top-1 (%), k = 20, T = 0.07, by evaluation size")
    table.add_column("size", justify="right")
    table.add_column("raw pixels", justify="right")
    for path in args.checkpoints:
        table.add_column(path.parent.name, justify="right")
    for size in args.sizes:
        kw = dict(size=size, resize=None if size == 28 else size, batch_size=256, backend=settings.backend,
                  device="cpu", workers=settings.workers)
        bank, queries = eval_loader(sources.bank, **kw), eval_loader(sources.queries, **kw)
        row = [str(size), f"{raw_pixel_knn(bank, queries, k=20).top1:.2f}"]
        row += [f"{loader_knn(load_backbone(path), bank, queries, k=20, device='cpu').top1:.2f}" for path in args.checkpoints]
        table.add_row(*row)
        print(" | ".join(row), flush=True)  # a Markdown-ready line as each size finishes
    Console().print(table)


if __name__ == "__main__":
    main()
