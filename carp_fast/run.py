"""The steps of a pretraining run, written once for every method: :func:`pretrain`.

A recipe (``recipes/*.py``) holds settings and names its method; :func:`pretrain` runs them::

    settings, config = parse_settings(defaults, argv, description, method)  # options, exit 2 on a bad one
    accelerator = start(settings, config)                          # processes, devices, precision, seed
    sources = open_sources(settings, config)                       # pretraining, k-NN bank, queries
    dls = pretraining_dataloaders(sources, settings, config, accelerator)
    learn = method_learner(method, dls, config, accelerator=accelerator, path=settings.out)
    learn.add_cbs(run_callbacks(settings, config, sources, accelerator, started))  # metrics, checkpoints, k-NN, budget
    baselines = knn_baselines(learn, settings)                     # random init and raw pixels
    learn.fit(settings.epochs)                                      # a --resume continues inside fit
    return finish(learn, settings, config, baselines)              # final k-NN, export, summary

Each step is a public function, for a notebook or a script that changes one of them. A run
writes to ``--out``: ``metrics.jsonl``, ``tensorboard/``, ``checkpoint.pth`` (resumable with
``--resume``), ``backbone_teacher.pth`` (+ ``.safetensors``; the student's backbone in a run
without a teacher network) and ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from .callbacks.preemption import EXIT_PREEMPTED
from . import run_folder
from .carp import CARP
from .device import DEVICES
from .learner import method_learner
from .method import Method
from .options import check_all, setting
from .options import parse_settings as _parse
from .pipelines.loaders import BACKENDS


EVAL_ON = ("test", "validation")  # --eval-on: the k-NN's queries (open_sources)


@dataclass
class TrainSettings:
    """Data, budget and output settings of a run (the method's are its :class:`~carp_fast.method.MethodConfig`)."""

    data: str = setting("fashion-mnist", "'fashion-mnist', or an ImageNet-layout folder (train/ and val/ with class folders)")
    data_root: str | None = setting(None, "where Fashion-MNIST's idx files are (default: Debian's /usr/share/datasets/fashion-mnist)")
    out: str = setting("runs/carp", "run directory: metrics, checkpoints, exported backbone")
    epochs: int = setting(100, "epochs of the schedules (learning rate, teacher momentum); with --minutes, the most")
    minutes: float | None = setting(None, "the whole run's budget, evaluation included: the schedules are sized to the steps "
                                          "this machine does in it (measured on the first steps; none: --epochs exactly)")
    train_images: int = setting(0, "pretrain on a fixed random subset of this many images (0: all)")
    resume: bool = setting(False, "continue from out/checkpoint.pth")
    overwrite: bool = setting(False, "start afresh in an --out that holds another run: first delete its metrics.jsonl, "
                                     "summary.json, baselines.json, checkpoint*, backbone_teacher.* and tensorboard/ "
                                     "(other files stay); without it or --resume such an --out is refused")
    # Crops (the global crop count is the method's global_crops)
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
    knn_random_init: bool = setting(False, "also evaluate the network at initialisation and raw pixels (printed side by side)")
    eval_on: str = setting("test", "the k-NN's queries: test (the test split; bank and pretraining from all training images) "
                                   "| validation (10k training images held out with a fixed seed, the same for every run; "
                                   "bank and pretraining from the rest). Tune on validation, measure the test once")
    linear_probe: bool = setting(False, "beside every k-NN evaluation, a linear probe trained on the bank's cached features "
                                        "and scored on the queries' (a few seconds on a CPU for small data)")
    checkpoint_every: int = setting(1, "epochs between checkpoints")
    checkpoint_minutes: float | None = setting(None, "minutes between checkpoints inside an epoch (None: at epoch ends only)")
    stop_signals: str = setting("SIGTERM,SIGINT,SIGUSR1", "signals that stop the run with a checkpoint at the step's end "
                                                          "(exit status 75; '--resume' continues); '' for none")
    progress: bool = setting(True, "show progress (a bar on a terminal; lines in a redirected log)")
    device: str = setting("auto", "auto (CUDA if usable; without it only the embedded Fashion-MNIST runs, on the CPU) "
                                  "| cuda | cpu (also ACCELERATE_USE_CPU=1)")

    def __post_init__(self):
        # Ranges arrive as lists from the command line or JSON; store them as tuples so that
        # a resumed run's settings compare equal.
        for name in ("global_scale", "local_scale", "blur_sigma"):
            setattr(self, name, tuple(getattr(self, name)))
        checks = [
            (self.epochs >= 1, "--epochs must be >= 1"),
            (self.minutes is None or self.minutes > 0, "--minutes must be > 0"),
            (self.train_images >= 0, "--train-images must be >= 0"),
            (min(self.global_size, self.local_size, self.eval_size) >= 1, "crop sizes must be >= 1 pixel"),
            (self.local_crops >= 0, "--local-crops must be >= 0"),
            (all(0 < lo <= hi <= 1 for lo, hi in (self.global_scale, self.local_scale)), "crop scales must satisfy 0 < LOW <= HIGH <= 1"),
            (0 <= self.blur_sigma[0] <= self.blur_sigma[1], "--blur-sigma must satisfy 0 <= LOW <= HIGH"),
            (self.backend in BACKENDS, f"--backend must be one of {BACKENDS}"),
            (self.device in DEVICES, f"--device must be one of {', '.join(DEVICES)}"),
            (self.workers >= 1, "--workers must be >= 1"),
            (self.knn_every >= 0 and self.knn_bank >= 0 and self.knn_queries >= 0, "--knn-every, --knn-bank and --knn-queries must be >= 0"),
            (self.eval_resize is None or self.eval_resize >= self.eval_size, "--eval-resize must be >= --eval-size (or None)"),
            (self.eval_on in EVAL_ON, f"--eval-on must be one of {', '.join(EVAL_ON)}"),
            (self.checkpoint_every >= 1, "--checkpoint-every must be >= 1"),
            (self.checkpoint_minutes is None or self.checkpoint_minutes > 0, "--checkpoint-minutes must be > 0 (or none)"),
            (all(isinstance(getattr(signal, n, None), signal.Signals) for n in self.signal_names()),
             "--stop-signals must name signals, e.g. SIGTERM,SIGINT,SIGUSR1"),
        ]
        check_all(checks, lambda message: f"{message}, got {self._value_of(message)}")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite exclude each other: continue the run in --out, or delete it and start afresh")
        _check_data(self.data)

    def signal_names(self) -> list[str]:
        """``stop_signals`` as a list of names (``SIGTERM``...)."""
        return [n.strip() for n in self.stop_signals.split(",") if n.strip()]

    def _value_of(self, message: str) -> str:
        option = message.split()[0].removeprefix("--").replace("-", "_")
        return repr(getattr(self, option)) if hasattr(self, option) else "another value"


def _check_data(data: str) -> None:
    """A cheap check of ``--data`` before anything starts: the folder exists and holds files."""
    if data == "fashion-mnist":
        return
    folder = Path(data)
    if not folder.is_dir():
        raise ValueError(f"--data {data!r}: no such folder; give an ImageNet-layout folder or 'fashion-mnist'")
    train = folder / "train" if (folder / "train").is_dir() else folder
    if any(p.suffix == ".tar" for p in train.iterdir()):  # tar shards (carp-fast make-shards): read when opened
        return
    classes = [p for p in train.iterdir() if p.is_dir()]
    if not classes or not any(any(p.iterdir()) for p in classes):
        raise ValueError(f"--data {data!r}: no class folders with images in {str(train)!r} (expected DIR/train/<class>/*)")


class SettingsError(ValueError):
    """A setting that cannot work, found while starting the run; the command line exits 2."""


EXIT_SETTINGS, EXIT_NON_FINITE, EXIT_DISK_FULL = 2, 3, 74  # and EXIT_PREEMPTED, 75 (callbacks.preemption)


def command_line(main: Callable) -> Callable:
    """Decorates a recipe's ``main``: the stops a user acts on end the program with one
    ``error:`` line and a status of their own instead of a traceback: a :class:`SettingsError`
    2 (as argparse for a malformed option), a non-finite loss or state 3 (lower the learning
    rate), a full disk 74 (sysexits' EX_IOERR). A signal's stop is 75 (:func:`pretrain`)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        from .callbacks import NonFiniteError
        from .checkpoint import DiskFullError

        statuses = {SettingsError: EXIT_SETTINGS, NonFiniteError: EXIT_NON_FINITE, DiskFullError: EXIT_DISK_FULL}
        try:
            result = main(*args, **kwargs)
            close_process_group()
            return result
        except tuple(statuses) as error:
            if isinstance(error, NonFiniteError):  # every process stops at the same step (a shared decision)
                close_process_group()
            status = next(code for kind, code in statuses.items() if isinstance(error, kind))
            message = str(error).split("\n\t")[-1]  # without fastai's "Exception occured in <callback>" prefix
            print(f"{Path(sys.argv[0]).name}: error: {message}", file=sys.stderr)
            raise SystemExit(status) from None

    return wrapper


def close_process_group() -> None:
    """Leave torch.distributed, where it was joined, before the program ends, as its docs ask: a
    group still open at interpreter exit can abort there ("terminate called without an active
    exception", exit -6 instead of the run's status; seen once in CI). Only where every process
    ends at the same point (a finished run, a non-finite stop, a signal's stop): with NCCL,
    leaving while a peer waits in a collective can hang. Accelerate's own call, which also leaves
    alone the group of a ``notebook_launcher`` fork (the notebook process keeps it)."""
    import torch.distributed as dist
    from accelerate.state import PartialState

    if dist.is_available() and dist.is_initialized():
        PartialState().destroy_process_group()


def parse_settings(defaults: dict, argv=None, description: str | None = None, method: Method = CARP):
    """``(TrainSettings, config)`` from the command line over a recipe's ``defaults``.

    A default of :data:`carp_fast.options.REQUIRED` makes the option required (``--data``
    of the ImageNet recipes); ``method.config`` holds the method's settings. A bad value ends
    the program with one error line, exit 2.
    """
    return _parse((TrainSettings, method.config), defaults, argv, description)


def _process_start() -> float:
    """``time.time()`` when this process started."""
    import psutil  # an Accelerate dependency

    return psutil.Process().create_time()


@command_line
def pretrain(method: Method, defaults: dict, argv=None, description: str | None = None) -> dict:
    """Pretrain ``method`` with a recipe's ``defaults`` under the command line ``argv``: train,
    evaluate and export. Returns the summary (also in ``out/summary.json``).

    ``--minutes`` counts from the process's start when the options come from the command line
    (``argv`` None), so that start-up counts too; else from this call.
    """
    started = _process_start() if argv is None else time.time()
    settings, config = parse_settings(defaults, argv, description, method)
    accelerator = start(settings, config)  # processes, devices, precision, seed
    sources = open_sources(settings, config)  # pretraining images, k-NN bank and queries
    dls = pretraining_dataloaders(sources, settings, config, accelerator)  # DALI (or torchvision) multi-crop
    learn = method_learner(method, dls, config, accelerator=accelerator, path=settings.out, progress=settings.progress)
    learn.add_cbs(run_callbacks(settings, config, sources, accelerator, started))  # metrics, checkpoints (resume), k-NN, budget
    baselines = knn_baselines(learn, settings)  # with --knn-random-init: the network at initialisation and the raw pixels
    learn.fit(settings.epochs)
    if getattr(learn, "preempted", None):  # stopped by a signal: checkpointed, nothing to finish
        close_process_group()  # every rank stops at the same step (the signal is a shared decision)
        raise SystemExit(EXIT_PREEMPTED)
    return finish(learn, settings, config, baselines)


# ---- the steps ------------------------------------------------------------------------------


def start(settings: TrainSettings, config):
    """The run's Accelerator (processes, devices) with carp_fast's precision as the only one,
    the global batch split over the processes, the seed set and ``--out`` made.

    When ``batch_size x processes`` does not divide ``global_batch`` but ``global_batch /
    processes`` is a smaller whole batch, the per-process batch becomes that (printed): the
    same global batch on 2 processes as on 1, with no option to change.
    """
    from accelerate.utils import set_seed

    from .accelerator import adopt_accelerate_precision, make_accelerator
    from .device import DeviceError, choose_device, device_line

    try:
        config.precision = adopt_accelerate_precision(config.precision)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    try:  # an ImageNet run without CUDA stops here unless --device cpu (the embedded data runs anywhere)
        device, facts = choose_device(settings.device, embedded=settings.data == "fashion-mnist")
    except DeviceError as error:
        raise SettingsError(str(error)) from None
    accelerator = make_accelerator(cpu=device == "cpu")
    accelerator.print(device_line(str(accelerator.device), facts))
    n_proc = accelerator.num_processes
    per_process, left = divmod(config.global_batch, n_proc)
    if config.global_batch % (config.batch_size * n_proc) and not left and per_process < config.batch_size:
        accelerator.print(f"batch_size {config.batch_size} -> {per_process} per process: global batch {config.global_batch} over {n_proc} processes")
        config.batch_size = per_process
    try:
        config.accumulation_steps(n_proc)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    set_seed(config.seed)
    try:  # --out: not a file, no live run in it, no other run's files unless --resume or --overwrite; locked
        run_folder.claim(settings.out, resume=settings.resume, overwrite=settings.overwrite, main=accelerator.is_main_process)
    except ValueError as error:
        raise SettingsError(str(error)) from None
    return accelerator


class Sources(NamedTuple):
    """The run's images: pretraining, the k-NN monitor's labelled bank and its queries (or
    None), and which split the queries are (``"test"`` or ``"validation"``)."""

    train: object
    bank: object
    queries: object | None
    eval_on: str = "test"


def open_sources(settings: TrainSettings, config) -> Sources:
    """Open ``--data``; ``--train-images`` and ``--knn-bank`` / ``--knn-queries`` take fixed
    random subsets (the same on every process and in a resumed run).

    ``--eval-on test``: pretraining and the bank draw from the whole training split, the
    queries are the test split. ``--eval-on validation``: 10k training images held out with a
    fixed seed (``carp_fast.pipelines.validation``, the same for every method and ``--seed``)
    are the queries; pretraining and the bank draw only from the other 50k. The one place
    where a run's images are chosen: the monitor, the final evaluation (k-NN and linear probe)
    and the raw-pixel baseline all read these sources.
    """
    from .pipelines import open_split
    from .pipelines.validation import split_validation

    try:
        full_train = open_split(settings.data, "train", root=settings.data_root)
        if settings.eval_on == "validation":
            full_train, queries = split_validation(full_train)  # the held-out 10k never reach pretraining or the bank
        else:
            queries = open_split(settings.data, "test", root=settings.data_root, required=False)
    except (FileNotFoundError, ValueError) as error:
        raise SettingsError(f"--data {settings.data!r}: {error}") from None
    return Sources(
        _subset(full_train, settings.train_images, config.seed),
        _subset(full_train, settings.knn_bank, config.seed + 1),
        None if queries is None else _subset(queries, settings.knn_queries, config.seed + 2),
        settings.eval_on,
    )


def _subset(source, n: int, seed: int):
    """A fixed random subset of ``n`` images (0: the whole source)."""
    return source.subset(n, seed) if 0 < n < len(source) else source


def pretraining_dataloaders(sources: Sources, settings: TrainSettings, config, accelerator):
    """fastai DataLoaders of multi-crop batches, this process's shard of every epoch."""
    from .pipelines import MultiCropConfig, crop_dataloaders, pretrain_loader

    crops = MultiCropConfig(
        global_crops=config.global_crops, global_size=settings.global_size, local_crops=settings.local_crops,
        local_size=settings.local_size, global_scale=settings.global_scale, local_scale=settings.local_scale,
        blur_sigma=settings.blur_sigma,
    )
    try:
        train_dl = pretrain_loader(
            sources.train, crops, batch_size=config.batch_size, backend=settings.backend, device=accelerator.device,
            shard_id=accelerator.process_index, num_shards=accelerator.num_processes, seed=config.seed,
            workers=settings.workers, strict=settings.strict_data,
        )
    except ValueError as error:  # e.g. fewer images than one global batch
        raise SettingsError(str(error)) from None
    return crop_dataloaders(train_dl, device=accelerator.device)


def run_callbacks(settings: TrainSettings, config, sources: Sources, accelerator, started: float | None = None) -> list:
    """What a run adds to the method's Learner: metrics.jsonl and TensorBoard, checkpoints
    (and, with ``--resume``, the restore of everything at the start of ``fit``), the k-NN
    monitor and the time budget (``--minutes`` from ``started``, a ``time.time()``; None: the
    start of the fit)."""
    from .callbacks import Checkpointer, KNNMonitor, MetricsLogger, Preemption, TimeBudget
    from .pipelines import eval_loader

    out = Path(settings.out)
    run_settings = {**dataclasses.asdict(settings), **config.to_dict()}
    try:
        checkpointer = Checkpointer(out, run_settings, every=settings.checkpoint_every, resume=settings.resume)
    except (FileNotFoundError, ValueError) as error:
        raise SettingsError(f"--resume: {error}") from None
    callbacks = [MetricsLogger(out), checkpointer, Preemption(settings.checkpoint_minutes, settings.signal_names())]
    if sources.queries is not None and (settings.knn_every > 0 or settings.knn_random_init):
        eval_kw = dict(size=settings.eval_size, resize=settings.eval_resize, batch_size=256, backend=settings.backend,
                       device=accelerator.device, workers=settings.workers)
        callbacks.append(KNNMonitor(eval_loader(sources.bank, **eval_kw), eval_loader(sources.queries, **eval_kw),
                                    every=settings.knn_every or settings.epochs, linear_probe=settings.linear_probe))
    if settings.minutes:
        callbacks.append(TimeBudget(settings.minutes, started=started))
    return callbacks


def knn_baselines(learn, settings: TrainSettings) -> dict:
    """With ``--knn-random-init``: the k-NN top-1 of the teacher at initialisation and of the
    raw pixels, on the monitor's bank and queries (same k and T); with ``--linear-probe``, the
    linear probe's top-1 of both too, on the same features (the pixels extracted once).

    Measured before the first step and kept in ``out/baselines.json``, from which a resumed
    run reads them back. Every process calls it; the main one evaluates while the others
    wait; the others get ``{}``.
    """
    knn = getattr(learn, "knn_monitor", None)
    if knn is None or not settings.knn_random_init:
        return {}
    file = Path(settings.out) / "baselines.json"
    if settings.resume:
        return json.loads(file.read_text()) if file.exists() and learn.accelerator.is_main_process else {}
    result = knn.evaluate_on_main()
    if result is None:
        return {}
    from .eval.knn import knn_accuracy
    from .eval.linear import bank_probe
    from .eval.pixels import raw_pixel_features

    bank, queries = raw_pixel_features(knn.train_dl), raw_pixel_features(knn.valid_dl)
    pixels = knn_accuracy(bank.features, bank.labels, queries.features, queries.labels,
                          k=min(knn.k, len(bank.labels)), temperature=knn.temperature)
    baselines = {"knn_top1_random_init": result[0], "knn_top1_raw_pixels": pixels.top1}
    if knn.linear_probe:
        baselines.update(linear_top1_random_init=knn.probe_top1, linear_top1_raw_pixels=bank_probe(bank, queries).top1)
    file.write_text(json.dumps(baselines) + "\n")
    return baselines


def finish(learn, settings: TrainSettings, config, baselines: dict) -> dict:
    """After ``fit``: the final k-NN where the fit ended before its scheduled one (a budget),
    the teacher's backbone exported (round-trip checked), ``summary.json``, the last line of
    ``metrics.jsonl`` with the k-NN numbers side by side, and a printed table. Every process
    calls it; returns the summary (on the main process)."""
    from .callbacks.accumulation import optimizer_steps
    from .export import export_backbone

    knn = getattr(learn, "knn_monitor", None)
    if knn is not None and knn.evaluated_epoch != learn.epoch:
        result = knn.evaluate_on_main()  # every rank decides alike; the others wait for the main one
        if result is not None:
            learn.knn_top1 = result[0]
            if knn.linear_probe:
                learn.linear_top1 = knn.probe_top1
    accelerator, out = learn.accelerator, Path(settings.out)
    summary = {"out": str(out), "method": learn.method.name}
    if accelerator.is_main_process:
        summary["epochs_run"] = learn.epoch + 1
        summary["steps_run"] = optimizer_steps(learn)
        summary["plan"] = getattr(learn, "plan", None)
        summary["stopped_early"] = getattr(learn, "stopped_early", False)
        if knn is not None:
            summary["knn_top1"] = learn.knn_top1
            if knn.linear_probe:
                summary["linear_top1"] = getattr(learn, "linear_top1", None)
            summary["eval_on"] = settings.eval_on  # which queries: the test split or the held-out validation images
        summary.update(baselines)
        summary["backbone"] = str(export_backbone(learn.model, out / "backbone_teacher.pth", arch=config.arch))
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if baselines and knn is not None:
            knn_numbers = {k: v for k, v in summary.items() if k.startswith(("knn_top1", "linear_top1"))}
            with (out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps({"epoch": learn.epoch, "final": True, **knn_numbers}) + "\n")
            _print_comparison(summary, knn, "teacher" if getattr(config, "teacher", True) else "student (no teacher)", settings.eval_on)
    accelerator.wait_for_everyone()
    run_folder.release(out)  # the run is written: another may use --out (the OS releases it at exit anyway)
    return summary


def _print_comparison(summary: dict, knn, network: str = "teacher", eval_on: str = "test") -> None:
    from rich.console import Console
    from rich.table import Table

    where = "the test set" if eval_on == "test" else "the validation split"
    table = Table(title=f"top-1 on {where} (k-NN: k = {knn.k}, T = {knn.temperature})")
    table.add_column("features")
    table.add_column("k-NN top-1 %", justify="right")
    probe = knn.linear_probe and "linear_top1_raw_pixels" in summary
    if probe:
        table.add_column("linear probe top-1 %", justify="right")
    rows = [("raw pixels", "_raw_pixels"), (f"{network} at random initialisation", "_random_init"),
            (f"trained {network} ({summary['steps_run']} steps)", "")]
    for name, suffix in rows:
        scores = [summary[f"knn_top1{suffix}"]] + ([summary[f"linear_top1{suffix}"]] if probe else [])
        table.add_row(name, *("-" if v is None else f"{v:.2f}" for v in scores))
    Console().print(table)

