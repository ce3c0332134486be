"""``carp-fast eval <protocol>``: evaluate a checkpoint's frozen backbone.

Examples::

    carp-fast eval knn --checkpoint runs/fmnist/model.pth --data fashion-mnist
    carp-fast eval kmeans --checkpoint runs/fmnist/model.pth --data fashion-mnist --out km.json
    carp-fast eval linear --checkpoint released.pth --arch resnet50 --data /data/imagenet
    carp-fast eval fewshot --checkpoint model.pth --data fashion-mnist --shots 1 4 16
    carp-fast eval retrieval --checkpoint model.pth --ground-truth roxford5k/gnd.json
    carp-fast eval copydetection --checkpoint model.pth --ground-truth copydays/gnd.json

Every protocol prints a rich table and, with ``--out FILE.json``, writes
``{"protocol", "results", "settings", "created"}``: the settings (checkpoint, its mtime,
which, arch, data, image size, protocol parameters, ...) are stored beside the results so
a number is never separated from how it was obtained. Features are extracted once per
(checkpoint, split, settings) and cached (``--cache-dir``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Any, Callable

from carp_fast.pipelines.loaders import BACKENDS

from . import data as eval_data
from .checkpoints import WHICH
from .fewshot import SEEDS, SHOTS
from .kmeans import PREPROCESS
from .knn import KS, TEMPERATURE

PROTOCOLS = ("knn", "kmeans", "linear", "fewshot", "retrieval", "copydetection")


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "carp_fast" / "features"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="carp-fast eval", description="Evaluate a frozen backbone (CARP paper, appendix D)."
    )
    sub = parser.add_subparsers(dest="protocol", required=True, metavar="PROTOCOL")

    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("weights")
    g.add_argument("--checkpoint", required=True, help="this project's checkpoint, the official code's, or a torchvision state dict")
    g.add_argument("--which", choices=WHICH, default="teacher", help="network to evaluate; the teacher is the paper's choice (appendix B.4)")
    g.add_argument("--arch", default=None, help="backbone architecture; default: the checkpoint's config, else resnet50")
    g.add_argument("--trust-checkpoint", action="store_true", help="unpickle arbitrary objects in the checkpoint (only for files you trust)")
    g = common.add_argument_group("extraction")
    g.add_argument("--size", type=int, default=None, help="image side fed to the backbone (default 28 for fashion-mnist, 224 otherwise)")
    g.add_argument("--resize", type=int, default=None, help="short side before the centre crop (default: none for 28 px fashion-mnist, 256 otherwise)")
    g.add_argument("--batch-size", type=int, default=256, help="images per extraction batch; lower it if memory runs out")
    g.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None, help="bf16 autocast (default: on with CUDA)")
    g.add_argument("--workers", type=int, default=2, help="DALI threads or DataLoader worker processes")
    g.add_argument("--backend", choices=BACKENDS, default="auto", help="image pipeline: auto (DALI if installed) | dali | torchvision")
    g.add_argument("--cache-dir", type=Path, default=default_cache_dir(), help="feature cache (default %(default)s)")
    g.add_argument("--no-cache", action="store_true", help="always extract, never read or write the cache")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = common.add_argument_group("output")
    g.add_argument("--out", type=Path, default=None, help="write results and settings to this JSON file")

    labelled = argparse.ArgumentParser(add_help=False)
    g = labelled.add_argument_group("data")
    g.add_argument("--data", default="fashion-mnist", help="'fashion-mnist' or an ImageNet-layout directory (train/ and val/ or test/)")
    g.add_argument("--train-limit", type=int, default=None, help="a fixed random subset of the training split (e.g. 20000 for a quick bank)")
    g.add_argument("--test-limit", type=int, default=None, help="a fixed random subset of the test split")
    g.add_argument("--subset-seed", type=int, default=0, help="seed of the --train-limit / --test-limit subsets")

    p = sub.add_parser("knn", parents=[common, labelled], help="weighted k-NN (DINO protocol)")
    p.add_argument("--k", type=int, nargs="+", default=list(KS), help="neighbours (paper reports 20)")
    p.add_argument("--temperature", type=float, default=TEMPERATURE, help="T in the vote weight exp(sim / T)")
    p.set_defaults(run=run_knn)

    p = sub.add_parser("kmeans", parents=[common, labelled], help="faiss k-means, NMI / AMI / ARI")
    p.add_argument("--niter", type=int, default=100)
    p.add_argument("--nredo", type=int, default=20, help="paper appendix D.4 says 20 redos")
    p.add_argument("--preprocess", choices=PREPROCESS, default="l2")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_kmeans)

    p = sub.add_parser("linear", parents=[common, labelled], help="linear probe on cached features")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1, help="peak learning rate (cosine decay)")
    p.add_argument("--probe-batch-size", type=int, default=256)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_linear)

    p = sub.add_parser("fewshot", parents=[common, labelled], help="n labelled images per class, 5 seeds")
    p.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    p.add_argument("--seeds", type=int, default=SEEDS)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=5e-4)
    p.set_defaults(run=run_fewshot)

    for name, run, text in (
        ("retrieval", run_retrieval, "revisited Oxford / Paris mAP (easy / medium / hard)"),
        ("copydetection", run_copydetection, "copy-detection mAP (Copydays protocol)"),
    ):
        p = sub.add_parser(name, parents=[common], help=text)
        p.add_argument("--ground-truth", type=Path, required=True, help="JSON: queries, database, gnd (see carp_fast.eval.retrieval)")
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``carp-fast eval``; returns the exit status (2 on bad input)."""
    args = build_parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError) as error:
        print(f"carp-fast eval {args.protocol}: error: {error}", file=sys.stderr)
        return 2
    return 0


# --- protocols ------------------------------------------------------------------------


def run_knn(args: argparse.Namespace) -> dict:
    from .knn import knn_accuracies

    train, test = _labelled_features(args)
    results = knn_accuracies(
        train.features, train.labels, test.features, test.labels,
        ks=args.k, temperature=args.temperature, device=args.device,
    )  # fmt: skip
    rows = [
        {"k": k, "temperature": args.temperature, "top1": r.top1, "top5": r.top5}
        for k, r in results.items()
    ]
    return _report(args, "k-NN", rows, {"k": args.k, "temperature": args.temperature}, train, test)


def run_kmeans(args: argparse.Namespace) -> dict:
    from .kmeans import kmeans_evaluate

    train, test = _labelled_features(args)
    protocol = {"niter": args.niter, "nredo": args.nredo, "preprocess": args.preprocess, "seed": args.seed,
                "spherical": True}  # the paper's protocol (appendix D.4)
    result = kmeans_evaluate(train.features, train.labels, test.features, test.labels, **protocol)
    return _report(args, "k-means", [result._asdict()], protocol, train, test)


def run_linear(args: argparse.Namespace) -> dict:
    from .linear import linear_probe

    train, test = _labelled_features(args)
    result = linear_probe(
        train.features, train.labels, test.features, test.labels,
        epochs=args.epochs, lr=args.lr, batch_size=args.probe_batch_size,
        weight_decay=args.weight_decay, seed=args.seed, device=args.device,
    )  # fmt: skip
    row = {"top1": result.top1, "top5": result.top5}
    return _report(args, "linear probe", [row], result.settings, train, test)


def run_fewshot(args: argparse.Namespace) -> dict:
    from .fewshot import few_shot_evaluate

    train, test = _labelled_features(args)
    results = few_shot_evaluate(
        train.features, train.labels, test.features, test.labels,
        shots=args.shots, seeds=args.seeds, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, device=args.device,
    )  # fmt: skip
    rows = [{"n": r.n, "top1_mean": r.mean, "top1_std": r.std, "runs": r.runs} for r in results.values()]
    protocol = {"shots": args.shots, "seeds": args.seeds, "classifier": "linear_probe",
                "epochs": args.epochs, "lr": args.lr, "weight_decay": args.weight_decay}  # fmt: skip
    return _report(args, "few-shot", rows, protocol, train, test)


def run_retrieval(args: argparse.Namespace) -> dict:
    from .retrieval import load_ground_truth, retrieval_map

    truth = load_ground_truth(args.ground_truth)
    queries, database = _file_features(args, truth)
    result = retrieval_map(queries.features, database.features, truth.gnd)
    row = {"mAP_easy": result.map_easy, "mAP_medium": result.map_medium, "mAP_hard": result.map_hard}
    for protocol, values in result.mp_at.items():
        row.update({f"mP@{k}_{protocol}": v for k, v in values.items()})
    return _report(args, "retrieval", [row], {"ground_truth": str(args.ground_truth.resolve())}, queries, database)


def run_copydetection(args: argparse.Namespace) -> dict:
    from .retrieval import copy_detection_map, load_ground_truth

    truth = load_ground_truth(args.ground_truth)
    queries, database = _file_features(args, truth)
    row = {"mAP": copy_detection_map(queries.features, database.features, truth.gnd)}
    return _report(args, "copy detection", [row], {"ground_truth": str(args.ground_truth.resolve())}, queries, database)


# --- features and output --------------------------------------------------------------


def _extraction_settings(args: argparse.Namespace, **data_settings) -> dict[str, Any]:
    """Resolve the architecture and backend; return the settings that change the features."""
    from carp_fast.pipelines.loaders import resolve_backend

    if args.arch is None:
        args.arch = _checkpoint_arch(args.checkpoint, args.trust_checkpoint)
    return {"which": args.which, "arch": args.arch, "backend": resolve_backend(args.backend), **data_settings}


def _checkpoint_arch(path: str, trust: bool) -> str:
    """``config["arch"]`` of this project's checkpoints, else ``"resnet50"``.

    The file is memory-mapped: only the small config is read, not the weights.
    """
    from .checkpoints import checkpoint_arch, read_checkpoint

    try:
        checkpoint = read_checkpoint(path, weights_only=not trust, mmap=True)
    except RuntimeError:  # not a zip checkpoint (legacy format): mmap is unsupported
        checkpoint = read_checkpoint(path, weights_only=not trust)
    return checkpoint_arch(checkpoint) or "resnet50"


def _features(args: argparse.Namespace, split: str, settings: dict, make_batches: Callable):
    from .checkpoints import load_backbone
    from .features import cached_features

    return cached_features(
        lambda: load_backbone(args.checkpoint, args.arch, args.which, weights_only=not args.trust_checkpoint),
        make_batches,
        checkpoint=args.checkpoint,
        split=split,
        settings=settings,
        cache_dir=None if args.no_cache else args.cache_dir,
        device=args.device,
        amp=args.amp,
        progress=not args.no_progress,
    )


def _labelled_features(args: argparse.Namespace):
    """Train and test :class:`Features` of ``--data``."""
    small = args.data == "fashion-mnist"
    size = args.size or (28 if small else 224)
    # Fashion-MNIST is 28 px: no resize unless another size is asked for (None = none).
    resize = args.resize or ((None if size == 28 else size) if small else 256)
    settings = _extraction_settings(args, data=args.data, size=size, resize=resize)
    args.settings = settings
    splits = []
    for split, limit in (("train", args.train_limit), ("test", args.test_limit)):
        make_batches = lambda split=split, limit=limit: eval_data.split_batches(  # noqa: E731
            args.data, split, size=size, resize=resize, batch_size=args.batch_size, workers=args.workers,
            backend=args.backend, device=args.device, limit=limit, seed=args.subset_seed,
        )
        limited = {"limit": limit, "subset_seed": args.subset_seed} if limit is not None else {"limit": None}
        splits.append(_features(args, split, {**settings, **limited}, make_batches))
    return splits


def _file_features(args: argparse.Namespace, truth):
    """Query and database :class:`Features` of a ground-truth file's image lists."""
    size = args.size or 224
    resize = args.resize or size  # the shorter side to `size`, then the centre square
    settings = _extraction_settings(
        args, size=size, resize=resize, ground_truth=str(args.ground_truth.resolve()),
        ground_truth_mtime=args.ground_truth.stat().st_mtime_ns,
    )
    args.settings = settings
    out = []
    for split, paths in (("queries", truth.queries), ("database", truth.database)):
        make = lambda paths=paths: eval_data.file_list_batches(  # noqa: E731
            paths, size=size, resize=resize, batch_size=args.batch_size, workers=args.workers,
            backend=args.backend, device=args.device,
        )
        out.append(_features(args, split, settings, make))
    return out


def _report(args, title: str, rows: list[dict], protocol: dict, first, second) -> dict:
    """Print a rich table of ``rows``; write the JSON record to ``--out``; return it."""
    from rich.console import Console
    from rich.table import Table

    checkpoint = os.path.abspath(args.checkpoint)
    settings = {
        "checkpoint": checkpoint,
        "checkpoint_mtime": datetime.datetime.fromtimestamp(os.path.getmtime(checkpoint)).isoformat(),
        **args.settings,
        "n": [len(first.labels), len(second.labels)],
        "feature_dim": int(first.features.shape[1]),
        **protocol,
    }
    record = {
        "protocol": args.protocol,
        "results": [{**row, "settings": settings} for row in rows],
        "settings": settings,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
    }
    table = Table(title=f"{title} — {Path(checkpoint).name} ({args.which})")
    for column in rows[0]:
        table.add_column(column, justify="right")
    for row in rows:
        table.add_row(*(_cell(v) for v in row.values()))
    Console().print(table)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(record, indent=2, default=str) + "\n")
    return record


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list):
        return " ".join(_cell(v) for v in value)
    return str(value)
