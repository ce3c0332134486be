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
table and, with ``--out FILE.json``, writes ``{"protocol", "results", "settings",
"created"}``: the settings (checkpoint, its mtime, which, arch, data, image size, the
protocol variant and every parameter, ...) are stored beside the results so a number is
never separated from how it was obtained. Features are extracted once per (checkpoint,
split, settings) and cached (``--cache-dir``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

from carp_fast.pipelines.loaders import BACKENDS

from . import data as eval_data
from .checkpoints import WHICH
from .copydetection import IMSIZE as COPY_IMSIZE
from .copydetection import TOP as COPY_TOP
from .fewshot import SEEDS, SHOTS
from .kmeans import MAX_POINTS_PER_CENTROID, NREDO, PREPROCESS
from .kmeans import SEED as KMEANS_SEED
from .knn import KS, TEMPERATURE
from .linear_grid import OPTIMIZERS, WEIGHT_DECAYS
from .retrieval import IMSIZE as RETRIEVAL_IMSIZE
from .voc import COST as VOC_COST
from .voc import DIFFICULT
from .voc import RUNS as VOC_RUNS
from .voc import SHOTS as VOC_SHOTS

PROTOCOLS = ("knn", "kmeans", "linear", "fewshot", "voc07", "retrieval", "copydetection")
VARIANTS = ("paper", "fast")


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
    g.add_argument("--size", type=int, default=None, help="image side fed to the backbone (default: what the checkpoint's run evaluated with on this data, else 28 for fashion-mnist, 224 otherwise)")
    g.add_argument("--resize", type=int, default=None, help="short side before the centre crop (default: the checkpoint's run's, else none for 28 px fashion-mnist, 256 otherwise)")
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

    p = sub.add_parser("kmeans", parents=[common, labelled], help="faiss k-means, NMI / AMI / ARI (paper D.4)")
    p.add_argument("--niter", type=int, default=100)
    p.add_argument("--nredo", type=int, default=NREDO, help="paper D.4 says 20 redos; the official script runs 10")
    p.add_argument("--preprocess", choices=PREPROCESS, default="standardize", help="standardize (train mean/std, the paper's) | l2 | none")
    p.add_argument("--max-points-per-centroid", type=int, default=MAX_POINTS_PER_CENTROID, help="faiss subsamples the fit to this many points per centroid (faiss default, kept by the official script); 0: all")
    p.add_argument("--subset-file", type=Path, default=None, help="fit on the training images named in this list (SimCLR's 10%% ImageNet subset: one nXXXXXXXX_YYYY.JPEG per line)")
    p.add_argument("--seed", type=int, default=KMEANS_SEED, help="faiss seed (its default, which the official script keeps)")
    p.set_defaults(run=run_kmeans)

    p = sub.add_parser("linear", parents=[common, labelled], help="linear evaluation (paper D.1: grid of heads on augmented crops)")
    p.add_argument("--protocol", dest="variant", choices=VARIANTS, default="paper", help="paper: iBOT grid on random-resized-crop views, 100 epochs; fast: one SGD probe on cached centre-crop features (not the paper's)")
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--probe-batch-size", type=int, default=256, help="images (paper) or features (fast) per step; the paper's lrs scale by it / 256")
    p.add_argument("--crop-size", type=int, default=None, help="paper: side of the random resized crop (default: --size)")
    p.add_argument("--lrs", type=float, nargs="+", default=None, help="paper: base lrs of the grid (default iBOT's 45: 1e-4 ... 9)")
    p.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS), help="paper: weight decays of the grid")
    p.add_argument("--optimizers", choices=OPTIMIZERS, nargs="+", default=list(OPTIMIZERS), help="paper: optimisers of the grid")
    p.add_argument("--lr", type=float, default=0.1, help="fast: peak learning rate (cosine decay)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="fast: weight decay")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(run=run_linear)

    p = sub.add_parser("fewshot", parents=[common, labelled], help="n labelled images per class, 5 runs (paper D.2, iNat2018 style)")
    p.add_argument("--protocol", dest="variant", choices=VARIANTS, default="paper", help="paper: 20 epochs, SGD, lr 0.03 / 10 at 12 and 18; fast: cached cosine probe (not the paper's)")
    p.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    p.add_argument("--seeds", type=int, default=SEEDS, help="independent runs per n")
    p.add_argument("--epochs", type=int, default=None, help="default: 20 (paper) or 100 (fast)")
    p.add_argument("--lr", type=float, default=None, help="default: 0.03 (paper text; the official launch script passes 0.3) or 0.1 (fast)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: 1e-6 (paper) or 5e-4 (fast)")
    p.set_defaults(run=run_fewshot)

    p = sub.add_parser("voc07", parents=[common], help="few-shot VOC07 mAP with linear SVMs (paper D.2, PCL protocol)")
    p.add_argument("--data", required=True, help="VOC2007 folder (JPEGImages/, ImageSets/Main/), or VOCdevkit/ or its parent")
    p.add_argument("--shots", type=int, nargs="+", default=list(VOC_SHOTS))
    p.add_argument("--runs", type=int, default=VOC_RUNS)
    p.add_argument("--cost", type=float, default=VOC_COST, help="LinearSVC C (official: 0.5)")
    p.add_argument("--difficult", choices=DIFFICULT, default="negative", help="difficult (0) labels: negatives as the official code, or left out of the AP")
    p.set_defaults(run=run_voc07)

    p = sub.add_parser("retrieval", parents=[common], help="revisited Oxford / Paris mAP (paper D.5)")
    p.add_argument("--ground-truth", type=Path, required=True, help="revisitop's gnd_roxford5k.pkl / gnd_rparis6k.pkl (images in jpg/ beside it), or a JSON (see carp_fast.eval.retrieval)")
    p.add_argument("--protocol", dest="variant", choices=VARIANTS, default="paper", help="paper: whole image, longer side --imsize, 3 scales; fast: a --size centre crop at one scale (not the paper's)")
    p.add_argument("--imsize", type=int, default=RETRIEVAL_IMSIZE, help="paper: longer side of each image (DINO --imsize)")
    p.add_argument("--multiscale", action=argparse.BooleanOptionalAction, default=True, help="paper: average features over scales 1, 1/sqrt(2), 1/2")
    p.set_defaults(run=run_retrieval)

    p = sub.add_parser("copydetection", parents=[common], help="Copydays 'strong' mAP over the top 20 (paper D.6)")
    p.add_argument("--data", default=None, help="Copydays folder as the official script reads it: original/*.jpg, strong/*.jpg")
    p.add_argument("--ground-truth", type=Path, default=None, help="instead of --data: a JSON with queries, database, gnd [{'ok': [...]}]")
    p.add_argument("--imsize", type=int, default=COPY_IMSIZE, help="images squashed to imsize x imsize (official 320)")
    p.add_argument("--top", type=int, default=COPY_TOP, help="ranks counted by the AP (official 20)")
    p.set_defaults(run=run_copydetection)
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
    n_train = len(train.labels)
    ks = [k for k in args.k if 1 <= k <= n_train]
    skipped = [k for k in args.k if k not in ks]
    if skipped:  # a small bank: report the k that fit rather than nothing
        print(f"carp-fast eval knn: note: skipping k = {skipped}, larger than the bank of n_train = {n_train} "
              "training features (or below 1)", file=sys.stderr)  # fmt: skip
    if not ks:
        raise ValueError(f"every k in {args.k} is outside 1..n_train = {n_train}; pass a smaller --k")
    results = knn_accuracies(
        train.features, train.labels, test.features, test.labels,
        ks=ks, temperature=args.temperature, device=args.device,
    )  # fmt: skip
    rows = [
        {"k": k, "temperature": args.temperature, "top1": r.top1, "top5": r.top5}
        for k, r in results.items()
    ]
    protocol = {"variant": "paper", "k": ks, "k_skipped": skipped, "temperature": args.temperature}
    return _report(args, "k-NN", rows, protocol, *_sizes(train, test))


def run_kmeans(args: argparse.Namespace) -> dict:
    from .kmeans import kmeans_evaluate

    train, test = _labelled_features(args, subset_file=args.subset_file)
    paper = args.preprocess == "standardize" and args.nredo in (10, 20) and args.niter == 100
    protocol = {"variant": "paper" if paper else "custom", "niter": args.niter, "nredo": args.nredo,
                "preprocess": args.preprocess, "spherical": True, "num_clusters": "number of classes",
                "max_points_per_centroid": args.max_points_per_centroid or None, "seed": args.seed,
                "subset_file": None if args.subset_file is None else str(args.subset_file.resolve())}  # fmt: skip
    result = kmeans_evaluate(
        train.features, train.labels, test.features, test.labels, niter=args.niter, nredo=args.nredo,
        preprocess=args.preprocess, max_points_per_centroid=args.max_points_per_centroid or None, seed=args.seed,
    )  # fmt: skip
    return _report(args, "k-means", [result._asdict()], protocol, *_sizes(train, test))


def run_linear(args: argparse.Namespace) -> dict:
    if args.variant == "fast":
        from .linear import linear_probe

        train, test = _labelled_features(args)
        result = linear_probe(
            train.features, train.labels, test.features, test.labels,
            epochs=args.epochs, lr=args.lr, batch_size=args.probe_batch_size,
            weight_decay=args.weight_decay, seed=args.seed, device=args.device,
        )  # fmt: skip
        row = {"top1": result.top1, "top5": result.top5}
        protocol = {"variant": "fast", "not_the_paper": "one SGD probe on cached, unaugmented, standardised features",
                    **result.settings}  # fmt: skip
        return _report(args, "linear probe (fast, not the paper's)", [row], protocol, *_sizes(train, test))
    return _run_linear_grid(args)


def _run_linear_grid(args: argparse.Namespace) -> dict:
    """Paper D.1: test features cached (resize + centre crop); training views augmented
    every epoch and fed through the frozen backbone to every head of the grid."""
    from carp_fast.pipelines import open_split

    from .checkpoints import load_backbone
    from .linear_grid import IBOT_LRS, Setting, linear_grid

    (test,) = _labelled_features(args, splits=("test",))
    crop = args.crop_size or args.settings["size"]
    grid = [Setting(lr, wd, opt) for lr in (args.lrs or IBOT_LRS) for wd in args.weight_decays for opt in args.optimizers]
    source = open_split(args.data, "train")
    if args.train_limit is not None and args.train_limit < len(source):
        source = source.subset(args.train_limit, args.subset_seed)
    epoch_batches = eval_data.augmented_epochs(source, size=crop, batch_size=args.probe_batch_size,
                                               workers=args.workers, seed=args.seed)  # fmt: skip
    backbone = load_backbone(args.checkpoint, args.arch, args.which, weights_only=not args.trust_checkpoint)
    num_classes = int(max(int(source.labels.max()), int(test.labels.max()))) + 1
    result = linear_grid(
        epoch_batches, test.features, test.labels, num_classes=num_classes, backbone=backbone, grid=grid,
        epochs=args.epochs, lr_batch_size=args.probe_batch_size, seed=args.seed, device=args.device,
        amp=args.amp, progress=not args.no_progress,
    )  # fmt: skip
    protocol = {"variant": "paper", "epochs": args.epochs, "train_views": f"random resized crop {crop} + flip, every epoch (torchvision)",
                "batch_size": args.probe_batch_size, "lr_scaling": "lr * batch_size / 256", "schedule": "cosine per epoch",
                "momentum": 0.9, "lars_eta": 0.001, "n_heads": len(grid), "grid": result.grid, "seed": args.seed}  # fmt: skip
    sizes = ([len(source), len(test.labels)], int(test.features.shape[1]))
    return _report(args, "linear evaluation (paper: best head of the grid)", [dict(result.best)], protocol, *sizes)


def run_fewshot(args: argparse.Namespace) -> dict:
    from .fewshot import PAPER, few_shot_evaluate

    train, test = _labelled_features(args)
    results = few_shot_evaluate(
        train.features, train.labels, test.features, test.labels,
        shots=args.shots, seeds=args.seeds, protocol=args.variant, epochs=args.epochs, lr=args.lr,
        weight_decay=args.weight_decay, device=args.device, progress=not args.no_progress,
    )  # fmt: skip
    rows = [{"n": r.n, "top1_mean": r.mean, "top1_std": r.std, "runs": r.runs} for r in results.values()]
    if args.variant == "paper":
        settings = {"epochs": args.epochs or PAPER["epochs"], "lr": args.lr or PAPER["lr"],
                    "weight_decay": PAPER["weight_decay"] if args.weight_decay is None else args.weight_decay,
                    "milestones": list(PAPER["milestones"]), "batch_size": PAPER["batch_size"], "momentum": 0.9,
                    "train_views": "cached centre-crop features (the official script augments)"}  # fmt: skip
    else:
        settings = {"classifier": "linear_probe", "not_the_paper": "cached cosine probe", "epochs": args.epochs or 100,
                    "lr": args.lr or 0.1, "weight_decay": 5e-4 if args.weight_decay is None else args.weight_decay}  # fmt: skip
    protocol = {"variant": args.variant, "shots": args.shots, "seeds": args.seeds, **settings}
    return _report(args, "few-shot", rows, protocol, *_sizes(train, test))


def run_voc07(args: argparse.Namespace) -> dict:
    from .voc import read_voc_split, voc_few_shot

    size, resize = args.size or 224, args.resize or 256
    splits = {name: read_voc_split(args.data, name) for name in ("trainval", "test")}
    settings = _extraction_settings(args, data=str(Path(args.data).resolve()), size=size, resize=resize)
    args.settings = settings
    features = {}
    for name, split in splits.items():
        make = lambda split=split: eval_data.file_list_batches(  # noqa: E731
            split.paths, size=size, resize=resize, batch_size=args.batch_size, workers=args.workers,
            backend=args.backend, device=args.device,
        )
        features[name] = _features(args, f"voc07-{name}", settings, make).features
    results = voc_few_shot(features["trainval"], splits["trainval"].labels, features["test"], splits["test"].labels,
                           shots=args.shots, runs=args.runs, cost=args.cost, difficult=args.difficult,
                           progress=not args.no_progress)  # fmt: skip
    rows = [{"n": r.n, "mAP_mean": r.mean, "mAP_std": r.std, "runs": r.runs} for r in results.values()]
    protocol = {"variant": "paper", "classifier": "LinearSVC per class", "cost": args.cost,
                "class_weight": {"1": 2, "-1": 1}, "features": "L2-normalised", "ap": "VOC interpolated, all points",
                "difficult": args.difficult, "shots": args.shots, "runs": args.runs}  # fmt: skip
    sizes = ([len(features[n]) for n in splits], int(features["test"].shape[1]))
    return _report(args, "few-shot VOC07 (linear SVMs)", rows, protocol, *sizes)


def run_retrieval(args: argparse.Namespace) -> dict:
    from .retrieval import load_ground_truth, retrieval_map

    truth = load_ground_truth(args.ground_truth)
    if args.variant == "paper":
        queries, database = _whole_image_features(args, truth.queries, truth.database, "thumbnail")
        protocol = {"variant": "paper", "imsize": args.imsize, "multiscale": args.multiscale,
                    "scales": list(_scales(args)), "resize": "PIL thumbnail (longer side = imsize, Lanczos)"}  # fmt: skip
    else:
        queries, database = _file_features(args, truth.queries, truth.database)
        protocol = {"variant": "fast", "not_the_paper": "a centre crop at one scale"}
    result = retrieval_map(queries.features, database.features, truth.gnd)
    row = {"mAP_easy": result.map_easy, "mAP_medium": result.map_medium, "mAP_hard": result.map_hard}
    for name, values in result.mp_at.items():
        row.update({f"mP@{k}_{name}": v for k, v in values.items()})
    protocol["ground_truth"] = str(args.ground_truth.resolve())
    return _report(args, "retrieval", [row], protocol, *_sizes(queries, database))


def run_copydetection(args: argparse.Namespace) -> dict:
    from .copydetection import copy_detection_map, load_copydays

    if (args.data is None) == (args.ground_truth is None):
        raise ValueError("pass either --data (a Copydays folder: original/, strong/) or --ground-truth (a JSON)")
    if args.data is not None:
        days = load_copydays(args.data)
        query_paths, database_paths, positives = days.queries, days.database, days.positives
        source = {"data": str(Path(args.data).resolve())}
    else:
        from .retrieval import load_ground_truth

        truth = load_ground_truth(args.ground_truth)
        query_paths, database_paths = truth.queries, truth.database
        positives = [entry["ok"] for entry in truth.gnd]
        source = {"ground_truth": str(args.ground_truth.resolve())}
    queries, database = _whole_image_features(args, query_paths, database_paths, "squash")
    row = {"mAP": copy_detection_map(queries.features, database.features, positives, top=args.top)}
    protocol = {"variant": "paper", "imsize": args.imsize, "resize": "squashed to imsize x imsize, bicubic",
                "top": args.top, "queries": len(query_paths), "distractors": None, "whitening": None, **source}  # fmt: skip
    return _report(args, "copy detection", [row], protocol, *_sizes(queries, database))


# --- features and output --------------------------------------------------------------


def _extraction_settings(args: argparse.Namespace, **data_settings) -> dict[str, Any]:
    """Resolve the architecture and backend; return the settings that change the features."""
    from carp_fast.pipelines.loaders import resolve_backend

    if args.arch is None:
        args.arch = _checkpoint_arch(args.checkpoint, args.trust_checkpoint)
    return {"which": args.which, "arch": args.arch, "backend": resolve_backend(args.backend), **data_settings}


def _checkpoint_arch(path: str, trust: bool) -> str:
    """The checkpoint's architecture (:func:`carp_fast.eval.checkpoints.infer_arch`).

    The file is memory-mapped: only the small config is read, not the weights.
    """
    from .checkpoints import infer_arch, read_checkpoint

    return infer_arch(read_checkpoint(path, weights_only=not trust, mmap=True))


def _trained_view(args: argparse.Namespace) -> tuple[int, int | None] | None:
    """``(eval_size, eval_resize)`` of the run that wrote ``--checkpoint``, when it was trained
    on ``--data`` and names them (this project's checkpoints), so that the CLI measures on the
    view the run's own k-NN used: the embedded default's is whole 28 px images shrunk to 18 px.
    None otherwise (then the data set's defaults apply)."""
    from .checkpoints import read_checkpoint

    try:
        checkpoint = read_checkpoint(args.checkpoint, weights_only=not args.trust_checkpoint, mmap=True)
    except ValueError:
        return None  # not a torch checkpoint (a safetensors export): loading the weights will say so
    settings = checkpoint.get("settings") if isinstance(checkpoint, Mapping) else None
    if not isinstance(settings, Mapping) or not isinstance(settings.get("eval_size"), int):
        return None
    if not _same_data(settings.get("data"), args.data):
        return None
    return settings["eval_size"], settings.get("eval_resize")


def _same_data(trained_on: Any, data: str) -> bool:
    """Whether a run's ``--data`` and this command's name the same data set (a name or a folder)."""
    if not isinstance(trained_on, str):
        return False
    if trained_on == data:
        return True
    return "fashion-mnist" not in (trained_on, data) and Path(trained_on).resolve() == Path(data).resolve()


def _features(args: argparse.Namespace, split: str, settings: dict, make_batches: Callable,
              wrap: Callable | None = None):
    """Cached features of one split; ``wrap(backbone)`` builds the model (e.g. multi-scale)."""
    from .checkpoints import load_backbone
    from .features import cached_features

    def make_model():
        backbone = load_backbone(args.checkpoint, args.arch, args.which, weights_only=not args.trust_checkpoint)
        return backbone if wrap is None else wrap(backbone)

    return cached_features(
        make_model,
        make_batches,
        checkpoint=args.checkpoint,
        split=split,
        settings=settings,
        cache_dir=None if args.no_cache else args.cache_dir,
        device=args.device,
        amp=args.amp,
        progress=not args.no_progress,
    )


def _labelled_features(args: argparse.Namespace, subset_file: Path | None = None, splits=("train", "test")):
    """:class:`Features` of the ``splits`` of ``--data`` (train: only the images of
    ``subset_file`` when given)."""
    small = args.data == "fashion-mnist"
    trained_view = None if args.size or args.resize else _trained_view(args)
    if trained_view is not None:  # the view the checkpoint's own run evaluated with
        size, resize = trained_view
    else:
        size = args.size or (28 if small else 224)
        # Fashion-MNIST is 28 px: no resize unless another size is asked for (None = none).
        resize = args.resize or ((None if size == 28 else size) if small else 256)
    settings = _extraction_settings(args, data=args.data, size=size, resize=resize)
    args.settings = settings
    out = []
    for split in splits:
        limit = args.train_limit if split == "train" else args.test_limit
        subset = subset_file if split == "train" else None
        make_batches = lambda split=split, limit=limit, subset=subset: eval_data.split_batches(  # noqa: E731
            args.data, split, size=size, resize=resize, batch_size=args.batch_size, workers=args.workers,
            backend=args.backend, device=args.device, limit=limit, seed=args.subset_seed, subset_file=subset,
        )
        limited = {"limit": limit, "subset_seed": args.subset_seed} if limit is not None else {"limit": None}
        if subset is not None:
            limited.update(subset_file=str(subset.resolve()), subset_mtime=subset.stat().st_mtime_ns)
        out.append(_features(args, split, {**settings, **limited}, make_batches))
    return out


def _file_features(args: argparse.Namespace, query_paths: list[str], database_paths: list[str]):
    """Query and database :class:`Features` of centre crops (``--protocol fast``)."""
    size = args.size or 224
    resize = args.resize or size  # the shorter side to `size`, then the centre square
    settings = _extraction_settings(args, size=size, resize=resize, **_truth_identity(args))
    args.settings = settings
    out = []
    for split, paths in (("queries", query_paths), ("database", database_paths)):
        make = lambda paths=paths: eval_data.file_list_batches(  # noqa: E731
            paths, size=size, resize=resize, batch_size=args.batch_size, workers=args.workers,
            backend=args.backend, device=args.device,
        )
        out.append(_features(args, split, settings, make))
    return out


def _scales(args) -> tuple[float, ...]:
    from .retrieval import SCALES

    return SCALES if getattr(args, "multiscale", False) else (1.0,)


def _whole_image_features(args: argparse.Namespace, query_paths: list[str], database_paths: list[str], how: str):
    """Query and database :class:`Features` of whole images: ``"thumbnail"`` (retrieval:
    longer side ``--imsize``, batch 1, multi-scale) or ``"squash"`` (copy detection)."""
    from .retrieval import MultiScale

    scales = _scales(args) if how == "thumbnail" else (1.0,)
    settings = _extraction_settings(args, view=how, imsize=args.imsize, scales=list(scales), **_truth_identity(args))
    args.settings = settings
    out = []
    for split, paths in (("queries", query_paths), ("database", database_paths)):
        if how == "thumbnail":
            make = lambda paths=paths: eval_data.thumbnail_batches(paths, imsize=args.imsize, workers=args.workers)  # noqa: E731
        else:
            make = lambda paths=paths: eval_data.squashed_batches(  # noqa: E731
                paths, size=args.imsize, batch_size=args.batch_size, workers=args.workers)
        wrap = (lambda backbone: MultiScale(backbone, scales)) if len(scales) > 1 else None
        out.append(_features(args, split, settings, make, wrap))
    return out


def _truth_identity(args) -> dict:
    """What names the evaluated images in the cache key: the ground truth or data folder."""
    path = Path(getattr(args, "ground_truth", None) or getattr(args, "data", None))
    return {"images_from": str(path.resolve()), "images_from_mtime": path.stat().st_mtime_ns}


def _sizes(first, second) -> tuple[list[int], int]:
    """``([n_first, n_second], D)`` of two :class:`Features`."""
    return [len(first.labels), len(second.labels)], int(first.features.shape[1])


def _report(args, title: str, rows: list[dict], protocol: dict, n: list[int], feature_dim: int) -> dict:
    """Print a rich table of ``rows``; write the JSON record to ``--out``; return it.

    The record's ``protocol`` is the subcommand; ``settings["variant"]`` says whether the
    numbers follow the paper's protocol (``"paper"``) or a cheaper one (``"fast"``)."""
    from rich.console import Console
    from rich.table import Table

    checkpoint = os.path.abspath(args.checkpoint)
    settings = {
        "checkpoint": checkpoint,
        "checkpoint_mtime": datetime.datetime.fromtimestamp(os.path.getmtime(checkpoint)).isoformat(),
        **args.settings,
        "n": n,
        "feature_dim": feature_dim,
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
