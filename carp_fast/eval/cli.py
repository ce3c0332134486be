"""``carp-fast eval <protocol>``: evaluate a checkpoint's frozen backbone.

Examples::

    carp-fast eval knn --checkpoint runs/fashion_mnist/checkpoint.pth --data fashion-mnist
    carp-fast eval kmeans --checkpoint released.pth --data /data/imagenet --subset-file 10percent.txt
    carp-fast eval linear --checkpoint released.pth --data /data/imagenet
    carp-fast eval fewshot --checkpoint released.pth --data /data/inat2018-folders
    carp-fast eval voc07 --checkpoint released.pth --data /data/VOCdevkit/VOC2007
    carp-fast eval retrieval --checkpoint released.pth --ground-truth /data/roxford5k/gnd_roxford5k.pkl
    carp-fast eval copydetection --checkpoint released.pth --data /data/copydays

Every protocol runs the paper's settings by default (appendix D; ``--protocol fast`` picks
the cheaper cached variants where one exists, labelled as not the paper's), prints a rich
table and, with ``--out FILE.json``, writes the results with the settings they were
obtained with (:mod:`.report`). Features are extracted once per (checkpoint, split,
settings) and cached (``--cache-dir``, :mod:`.frozen`).

This module is wiring only: each protocol's module owns its options (``add_arguments``)
and its run (``run_from_args``); here the parser is built from them, the checkpoint is
read once into a :class:`~.frozen.FrozenBackbone`, and the subcommand is dispatched.
"""

from __future__ import annotations

import argparse
import sys

from . import copydetection, fewshot, frozen, kmeans, knn, linear_grid, report, retrieval, voc

# subcommand -> (the module owning its options and run, help, whether it reads a labelled --data set)
PROTOCOLS = {
    "knn": (knn, "weighted k-NN (DINO protocol)", True),
    "kmeans": (kmeans, "faiss k-means, NMI / AMI / ARI (paper D.4)", True),
    "linear": (linear_grid, "linear evaluation (paper D.1: grid of heads on augmented crops)", True),
    "fewshot": (fewshot, "n labelled images per class, 5 runs (paper D.2, iNat2018 style)", True),
    "voc07": (voc, "few-shot VOC07 mAP with linear SVMs (paper D.2, PCL protocol)", False),
    "retrieval": (retrieval, "revisited Oxford / Paris mAP (paper D.5)", False),
    "copydetection": (copydetection, "Copydays 'strong' mAP over the top 20 (paper D.6)", False),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carp-fast eval", description="Evaluate a frozen backbone (CARP paper, appendix D)."
    )
    sub = parser.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")
    common = argparse.ArgumentParser(add_help=False)
    frozen.add_arguments(common)
    report.add_arguments(common)
    labelled = argparse.ArgumentParser(add_help=False)
    frozen.add_labelled_arguments(labelled)
    for name, (module, summary, reads_labelled_data) in PROTOCOLS.items():
        subparser = sub.add_parser(name, parents=[common, labelled] if reads_labelled_data else [common], help=summary)
        module.add_arguments(subparser)
        subparser.set_defaults(run=module.run_from_args)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``carp-fast eval``; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        backbone = frozen.FrozenBackbone.from_args(args)
        result = args.run(args, backbone)
        result.print_table(args.checkpoint, args.which)
        if args.out is not None:
            report.write_record(args.out, result.record(args.protocol, args.checkpoint))
    except (ValueError, FileNotFoundError) as error:
        print(f"carp-fast eval {args.protocol}: error: {error}", file=sys.stderr)
        return 2
    return 0
