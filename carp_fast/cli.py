"""The ``carp-fast`` console command: ``train``, ``bench-data``, ``make-shards``, ``eval``.

The training-step benchmark is a script of the repository, ``benchmarks/bench_train.py``.

Each subcommand hands its remaining arguments to the module that owns it, so ``--help``
of a subcommand lists exactly that module's options.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("carp_fast.train", "pretrain CARP (recipes' options; default: the embedded Fashion-MNIST run)"),
    "bench-data": ("carp_fast.pipelines.bench", "images/s of the DALI or torchvision multi-crop pipeline"),
    "make-shards": ("carp_fast.pipelines.make_shards", "convert an ImageNet-layout folder into tar shards (WebDataset)"),
    "eval": ("carp_fast.eval.cli", "k-NN, k-means, linear, few-shot, retrieval evaluation of a checkpoint"),
}


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        width = max(map(len, COMMANDS))
        lines = [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: carp-fast {" + ",".join(COMMANDS) + "} [options]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            raise SystemExit(f"carp-fast: unknown command {argv[0]!r}")
        return
    module, _ = COMMANDS[argv[0]]
    result = importlib.import_module(module).main(argv[1:])
    if isinstance(result, int) and result:  # eval's exit status (train returns its summary)
        raise SystemExit(result)


if __name__ == "__main__":
    main()
