"""A CARP pretraining run: data, learner, callbacks, resume, export.

Recipes (``recipes/*.py``) are a dict of settings and one call to :func:`main`; ``carp-fast
train --recipe NAME`` runs the same. Every setting of :class:`TrainSettings` and
:class:`~carp_fast.learner.CARPConfig` is a command-line option (``--batch-size 64``,
``--no-sync-bn``, ...); ``--help`` lists them with their defaults.

A run writes to ``--out``: ``metrics.jsonl``, ``tensorboard/``, ``checkpoint.pth``
(resumable with ``--resume``), ``backbone_teacher.pth`` (torchvision format) and
``summary.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import runpy
from dataclasses import dataclass
from pathlib import Path

import torch
from fastai.callback.core import Callback

from .callbacks.accumulation import GradientAccumulation
from .learner import CARPConfig, carp_learner, setting


@dataclass
class TrainSettings:
    """Data, budget and output settings of a run (the model's are in CARPConfig)."""

    data: str = setting("fashion-mnist", "'fashion-mnist', or an ImageNet-layout folder (with train/ and val/ or class folders)")
    data_root: str | None = setting(None, "where Fashion-MNIST's idx files are (default: Debian's /usr/share/datasets/fashion-mnist)")
    out: str = setting("runs/carp", "run directory: metrics, checkpoints, exported backbone")
    epochs: int = setting(100, "epochs of the schedules (learning rate, teacher momentum)")
    minutes: float | None = setting(None, "stop after the epoch at which the next one would pass this budget")
    train_images: int = setting(0, "pretrain on a fixed random subset of this many images (0: all)")
    resume: bool = setting(False, "continue from out/checkpoint.pth")
    # Crops (the global crop count is CARPConfig.global_crops)
    global_size: int = setting(224, "global crop size in pixels")
    local_size: int = setting(96, "local crop size in pixels")
    local_crops: int = setting(6, "local crops per image (0: no multi-crop)")
    global_scale: tuple[float, float] = setting((0.2, 1.0), "random-resized-crop area range of global crops")
    local_scale: tuple[float, float] = setting((0.05, 0.2), "random-resized-crop area range of local crops")
    blur_sigma: tuple[float, float] = setting((0.1, 2.0), "Gaussian blur sigma range")
    backend: str = setting("auto", "input pipeline: auto (DALI if installed) | dali | torchvision")
    workers: int = setting(4, "DALI threads or DataLoader workers per process")
    strict_data: bool = setting(False, "stop on the first unreadable image instead of skipping it")
    # Monitoring
    knn_every: int = setting(10, "epochs between k-NN evaluations (0: never; always after the last)")
    knn_bank: int = setting(0, "labelled training images in the k-NN bank (0: all)")
    knn_queries: int = setting(0, "evaluation images queried (0: all)")
    eval_size: int = setting(224, "evaluation crop size")
    eval_resize: int | None = setting(256, "evaluation resize before the centre crop (None: none)")
    knn_random_init: bool = setting(False, "also evaluate the network at initialisation (printed side by side)")
    checkpoint_every: int = setting(1, "epochs between checkpoints")
    progress: bool = setting(True, "show progress (a bar on a terminal, a line per epoch otherwise)")

    def __post_init__(self):
        # Ranges arrive as lists from the command line or JSON; store them as tuples so that
        # a resumed run's settings compare equal.
        for name in ("global_scale", "local_scale", "blur_sigma"):
            setattr(self, name, tuple(getattr(self, name)))


# ---- data ---------------------------------------------------------------------------------


def _subset(source, n: int, seed: int):
    """A fixed random subset of ``n`` images (0: the whole source)."""
    return source.subset(n, seed) if n > 0 else source


def open_data(settings: TrainSettings):
    """(pretraining source, labelled bank source, labelled query source or None)."""
    from carp_fast.pipelines import open_split

    train = open_split(settings.data, "train", root=settings.data_root)
    return train, train, open_split(settings.data, "test", root=settings.data_root, required=False)


# ---- the run ------------------------------------------------------------------------------


def train(settings: TrainSettings, config: CARPConfig) -> dict:
    """Run CARP pretraining; returns the summary written to ``out/summary.json``."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from carp_fast.pipelines import MultiCropConfig, crop_dataloaders, eval_loader, pretrain_loader

    from .callbacks import Checkpointer, KNNMonitor, MetricsLogger, TimeBudget
    from .checkpoint import CHECKPOINT_NAME, check_same_run, load_checkpoint, restore_checkpoint
    from .export import export_backbone

    # Everything that can be wrong is checked before the first step.
    if settings.epochs < 1:
        raise ValueError(f"--epochs must be >= 1, got {settings.epochs}")
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    config.accumulation_steps(accelerator.num_processes)  # raises if the global batch does not divide
    set_seed(config.seed)
    out = Path(settings.out)
    run_settings = {**dataclasses.asdict(settings), **config.to_dict()}
    resume_state = None
    if settings.resume:
        resume_state = load_checkpoint(out / CHECKPOINT_NAME)
        check_same_run(resume_state["settings"], run_settings, out / CHECKPOINT_NAME)
    out.mkdir(parents=True, exist_ok=True)

    # Data: every rank reads its own shard; the k-NN monitor runs on the main process.
    train_source, bank_source, query_source = open_data(settings)
    train_source = _subset(train_source, settings.train_images, config.seed)
    crops = MultiCropConfig(
        global_crops=config.global_crops, global_size=settings.global_size, local_crops=settings.local_crops,
        local_size=settings.local_size, global_scale=settings.global_scale, local_scale=settings.local_scale,
        blur_sigma=settings.blur_sigma,
    )
    train_dl = pretrain_loader(
        train_source, crops, batch_size=config.batch_size, backend=settings.backend, device=accelerator.device,
        shard_id=accelerator.process_index, num_shards=accelerator.num_processes, seed=config.seed,
        workers=settings.workers, strict=settings.strict_data,
    )
    dls = crop_dataloaders(train_dl, device=accelerator.device)

    callbacks = [MetricsLogger(out)]
    callbacks.append(Checkpointer(out, run_settings, every=settings.checkpoint_every))
    knn = None
    if query_source is not None and (settings.knn_every > 0 or settings.knn_random_init):
        eval_kw = dict(size=settings.eval_size, resize=settings.eval_resize, batch_size=256, backend=settings.backend,
                       device=accelerator.device, workers=settings.workers)
        bank = eval_loader(_subset(bank_source, settings.knn_bank, config.seed + 1), **eval_kw)
        queries = eval_loader(_subset(query_source, settings.knn_queries, config.seed + 2), **eval_kw)
        knn = KNNMonitor(bank, queries, every=settings.knn_every or settings.epochs)
        callbacks.append(knn)
    if settings.minutes:
        callbacks.append(TimeBudget(settings.minutes))
    learn = carp_learner(dls, config, accelerator=accelerator, cbs=callbacks, path=out, progress=settings.progress)

    summary = {"out": str(out)}
    if knn is not None and settings.knn_random_init and resume_state is None:
        summary["knn_top1_random_init"] = knn.evaluate()[0] if accelerator.is_main_process else None

    start_epoch = 0
    if resume_state is not None:
        learn.create_opt()
        restore_checkpoint(learn, resume_state)
        start_epoch = learn.first_epoch = resume_state["epoch"]
        learn.add_cb(_RestoreCounters(resume_state))
        accelerator.print(f"resuming {out / CHECKPOINT_NAME} at epoch {start_epoch}")
    if start_epoch < settings.epochs:
        learn.fit(settings.epochs)

    # Results, export and summary (main process).
    if accelerator.is_main_process:
        summary["epochs_run"] = (learn.epoch + 1) if start_epoch < settings.epochs else start_epoch
        summary["stopped_early"] = getattr(learn, "stopped_early", False)
        if knn is not None:
            if not knn.history or knn.history[-1]["epoch"] != learn.epoch:  # a budget stopped the fit early
                learn.knn_top1 = knn.evaluate()[0]
            summary["knn_top1"] = learn.knn_top1
        backbone = export_backbone(learn.model, out / "backbone_teacher.pth", arch=config.arch)
        summary["backbone"] = str(backbone)
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if "knn_top1_random_init" in summary:
            _print_comparison(summary)
    accelerator.wait_for_everyone()
    return summary


class _RestoreCounters(Callback):
    """Puts the step counters of a resumed run back after fastai's callbacks reset them."""

    order = GradientAccumulation.order + 1

    def __init__(self, state: dict):
        self.state = state

    def before_fit(self):
        self.learn.train_iter = self.state["train_iter"]
        accumulation = getattr(self.learn, "gradient_accumulation", None)
        if accumulation is not None:
            accumulation.count = self.state["accumulation_count"]


def _print_comparison(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="k-NN top-1 on the test set (k = 20, T = 0.07)")
    table.add_column("teacher")
    table.add_column("k-NN top-1 %", justify="right")
    table.add_row("random initialisation", f"{summary['knn_top1_random_init']:.2f}")
    table.add_row(f"trained ({summary['epochs_run']} epochs)", f"{summary['knn_top1']:.2f}")
    Console().print(table)


# ---- command line ---------------------------------------------------------------------------


def _option_type(annotation: str):
    """(argparse kwargs) for a dataclass field annotation such as 'float | None'."""
    base = annotation.replace(" | None", "").strip()
    if base == "bool":
        return {"action": argparse.BooleanOptionalAction}
    if base.startswith("tuple["):
        return {"type": float, "nargs": 2, "metavar": ("LOW", "HIGH")}
    kind = {"int": int, "float": float, "str": str}[base]
    if "None" in annotation:
        return {"type": lambda s, kind=kind: None if s.lower() == "none" else kind(s)}
    return {"type": kind}


def build_parser(defaults: dict, description: str | None = None) -> argparse.ArgumentParser:
    """Options for every field of TrainSettings and CARPConfig, with ``defaults`` applied."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    known = set()
    for cls in (TrainSettings, CARPConfig):
        group = parser.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            known.add(f.name)
            default = defaults.get(f.name, f.default)
            group.add_argument(
                "--" + f.name.replace("_", "-"), dest=f.name, default=default,
                help=f"{f.metadata.get('help', '')} (default: {default})", **_option_type(str(f.type)),
            )
    unknown = set(defaults) - known
    if unknown:
        raise ValueError(f"unknown settings in the recipe: {sorted(unknown)}")
    return parser


def parse(argv: list[str] | None, defaults: dict, description: str | None = None) -> tuple[TrainSettings, CARPConfig]:
    args = vars(build_parser(defaults, description).parse_args(argv))
    settings = TrainSettings(**{f.name: args[f.name] for f in dataclasses.fields(TrainSettings)})
    config = CARPConfig(**{f.name: args[f.name] for f in dataclasses.fields(CARPConfig)})
    return settings, config


def run(defaults: dict, argv: list[str] | None = None, description: str | None = None) -> dict:
    """What a recipe calls: parse the command line over ``defaults`` and train."""
    settings, config = parse(argv, defaults, description)
    return train(settings, config)


RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"


def main(argv: list[str] | None = None) -> None:
    """``carp-fast train [--recipe fashion_mnist|in1k|in1k_mc|FILE.py] [options]``."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--recipe", default="fashion_mnist")
    known, rest = pre.parse_known_args(argv)
    path = Path(known.recipe) if known.recipe.endswith(".py") else RECIPES_DIR / f"{known.recipe}.py"
    if not path.is_file():
        raise SystemExit(f"carp-fast train: no recipe {known.recipe!r} (looked for {path})")
    recipe = runpy.run_path(str(path), run_name="carp_fast_recipe")
    run(recipe["SETTINGS"], rest, recipe.get("__doc__"))

