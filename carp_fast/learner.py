"""A fastai Learner for CARP: model, objective, optimizer, schedules and callbacks.

:func:`carp_learner` wires the pieces the way the paper trains (appendix C.1): LARS
(momentum 0.9, eta 0.001, no weight decay or adaptation on 1-d parameters), weight decay
1e-6, learning rate ``base_lr * global_batch / 256`` with cosine decay (no warm-up) to the
absolute ``final_lr`` (not scaled with the batch, as the official code), a teacher momentum
cosine from 0.99 to 1, mixed precision, SyncBatchNorm, and gradient
accumulation toward a global batch of 4096. Processes and devices come from Accelerate.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from functools import partial

import torch
from fastai.callback.core import Callback, CancelEpochException, TrainEvalCallback
from fastai.callback.schedule import SchedCos
from fastai.learner import Learner
from fastai.optimizer import OptimWrapper
from fastai.torch_core import trainable_params

from .accelerator import check_accelerator, make_accelerator
from .callbacks.accumulation import GradientAccumulation
from .callbacks.carp_stats import CARPStats
from .callbacks.channels_last import ChannelsLastInputs
from .callbacks.data_wait import DataWait
from .callbacks.epoch_sync import EpochSync
from .callbacks.precision import PRECISIONS, auto_channels_last, auto_precision, precision_callbacks
from .callbacks.progress import RichProgress
from .callbacks.recorder import DeviceRecorder
from .callbacks.schedule import OptimizerStepScheduler
from .callbacks.teacher_ema import TeacherEMA
from .lars import lars_optimizer
from .loss import CARPLoss
from .networks import StudentTeacher
from .partition import PARTITION_MODES
from .sync_bn import convert_sync_batchnorm

OPTIMIZERS = ("lars", "adamw")


def setting(default, help: str):
    """A dataclass field with a help text (the command line's ``--help`` shows it)."""
    return field(default=default, metadata={"help": help})


@dataclass
class CARPConfig:
    """Settings of a CARP run. Defaults are the paper's ImageNet ResNet-50 multi-crop run."""

    # Model
    arch: str = setting("resnet50", "backbone: resnet50 | resnet18 | resnet18_small | resnet10_tiny (the last two for 28-64 px images)")
    n_prototypes: int = setting(65536, "K, the number of prototypes")
    block_size: int = setting(512, "B prototypes per partition block; B = K is CARL (collapses)")
    partition: str = setting("random", "random: new partition every step | fixed: the paper's ablation")
    hidden_dim: int = setting(2048, "projection head hidden width")
    embed_dim: int = setting(256, "projection head output width D")
    global_crops: int = setting(2, "leading crops that the teacher also sees")
    teacher_batch_stats: bool = setting(True, "teacher BatchNorm on batch statistics, as DINO/BYOL")
    # Optimisation
    optimizer: str = setting("lars", "lars (paper) | adamw (better for short, small runs)")
    base_lr: float = setting(0.6, "peak lr per 256 images (x global_batch / 256); 0.6 up to 200 epochs, 0.3 for 400 (paper C.1)")
    final_lr: float = setting(0.006, "absolute lr at the end of the cosine, not scaled with the batch; 0.006 with base 0.6, 0.003 with 0.3")
    weight_decay: float = setting(1e-6, "L2 weight decay of >1-d parameters (paper: 1e-6)")
    final_weight_decay: float | None = setting(None, "absolute weight decay at the end of its cosine; None: constant")
    lars_momentum: float = setting(0.9, "LARS heavy-ball momentum")
    lars_eta: float = setting(0.001, "LARS trust coefficient")
    batch_size: int = setting(64, "images per process per micro-batch")
    global_batch: int = setting(4096, "images per optimizer step; batch_size x processes x accumulation")
    teacher_momentum: float = setting(0.99, "teacher EMA momentum at the start; cosine to 1.0 over the fit")
    # Speed
    precision: str = setting("auto", "auto (bf16 on CUDA and on CPUs with bf16 units, else fp32) | bf16 | fp16 (autocast + GradScaler, as the paper; slow on CPUs) | fp32")
    channels_last: bool | None = setting(None, "channels_last memory format; None: on with CUDA and on oneDNN CPUs")
    sync_bn: bool = setting(True, "batch statistics over all processes (torch's SyncBatchNorm on CUDA)")
    # Logging
    log_every: int = setting(50, "batches between host syncs for the logged statistics")
    seed: int = setting(0, "seed of the partitions and of the run")

    def __post_init__(self):
        checks = [
            (self.partition in PARTITION_MODES, f"partition must be one of {PARTITION_MODES}"),
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.precision in PRECISIONS + ("auto",), f"precision must be one of {PRECISIONS + ('auto',)}"),
            (self.n_prototypes >= 1, "n_prototypes must be >= 1"),
            (1 <= self.block_size <= self.n_prototypes, f"block_size must be in [1, n_prototypes={self.n_prototypes}]"),
            (self.base_lr > 0, "base_lr must be > 0"),
            (0 <= self.final_lr <= self.peak_lr(), f"final_lr must be in [0, the peak lr base_lr x global_batch / 256 = {self.peak_lr():.3g}] (it is absolute: set --final-lr with a small --base-lr)"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (self.batch_size >= 1 and self.global_batch >= 1, "batch_size and global_batch must be >= 1"),
            (0 <= self.teacher_momentum <= 1, "teacher_momentum must be in [0, 1]"),
            (1 <= self.global_crops, "global_crops must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"CARPConfig: {message}; got {self.describe()}")

    def describe(self) -> str:
        return ", ".join(f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def accumulation_steps(self, num_processes: int) -> int:
        """Micro-batches per optimizer step so that batch x processes x steps = global batch."""
        per_step = self.batch_size * num_processes
        if self.global_batch % per_step:
            raise ValueError(
                f"global_batch={self.global_batch} is not a multiple of batch_size x processes = "
                f"{self.batch_size} x {num_processes}; change --global-batch or --batch-size"
            )
        return self.global_batch // per_step

    def resolved_precision(self, device: torch.device) -> str:
        """``precision`` with "auto" decided for ``device`` (see :func:`auto_precision`)."""
        return auto_precision(device) if self.precision == "auto" else self.precision

    def peak_lr(self) -> float:
        """``base_lr * global_batch / 256`` (the linear scaling rule the paper follows)."""
        return self.base_lr * self.global_batch / 256


def build_model(config: CARPConfig) -> StudentTeacher:
    """The student/teacher pair described by ``config``."""
    return StudentTeacher(
        arch=config.arch,
        n_prototypes=config.n_prototypes,
        block_size=config.block_size,
        partition=config.partition,
        global_crops=config.global_crops,
        hidden_dim=config.hidden_dim,
        embed_dim=config.embed_dim,
        seed=config.seed,
        teacher_batch_stats=config.teacher_batch_stats,
    )


def opt_func(config: CARPConfig):
    """fastai ``opt_func`` of ``config.optimizer``: LARS (the paper's) or AdamW, with its weight decay."""
    if config.optimizer == "lars":
        return partial(lars_optimizer, momentum=config.lars_momentum, weight_decay=config.weight_decay, eta=config.lars_eta)
    return partial(OptimWrapper, opt=partial(torch.optim.AdamW, weight_decay=config.weight_decay))


def lr_wd_schedules(config: CARPConfig) -> OptimizerStepScheduler:
    """The official per-optimizer-step cosines: lr from ``peak_lr()`` to the absolute ``final_lr``,
    weight decay from ``weight_decay`` to ``final_weight_decay`` (constant when None)."""
    final_wd = config.weight_decay if config.final_weight_decay is None else config.final_weight_decay
    return OptimizerStepScheduler({"lr": SchedCos(config.peak_lr(), config.final_lr), "wd": SchedCos(config.weight_decay, final_wd)})


class CARPLearner(Learner):
    """fastai's Learner, able to start a fit at ``self.first_epoch`` (a resumed run).

    fastai's own ``fit(start_epoch=...)`` cancels the skipped epochs one by one, which still
    runs every callback's ``after_epoch`` for them (metrics, checkpoints, k-NN); here they
    are simply not iterated.
    """

    first_epoch = 0

    def _do_fit(self):
        try:
            self.epoch = min(self.first_epoch, self.n_epoch) - 1  # stays the last epoch if none is left
            epoch = self.first_epoch
            while epoch < self.n_epoch:  # re-read: a TimeBudget sets n_epoch once it has planned the fit
                self.epoch = epoch
                self._with_events(self._do_epoch, "epoch", CancelEpochException)
                epoch += 1
        finally:
            self.first_epoch = 0  # a resume applies to one fit


def carp_learner(dls, config: CARPConfig, *, accelerator=None, cbs=None, path: str = ".", progress: bool = True) -> Learner:
    """A fastai :class:`~fastai.learner.Learner` that trains CARP on ``dls``.

    Args:
        dls: fastai ``DataLoaders`` whose training batches are
            ``(crop_0 [N,3,G,G], ..., crop_{V-1} [N,3,L,L], labels [N])`` with the
            ``config.global_crops`` global crops first (see ``carp_fast.pipelines.crop_dataloaders``).
        config: the run's settings.
        accelerator: an ``accelerate.Accelerator``; one is made if None. Its device is used,
            and with several processes the model is wrapped in DistributedDataParallel.
        cbs: extra callbacks (e.g. :class:`~carp_fast.callbacks.KNNMonitor`).
        path: fastai's working directory (``learn.save`` writes under ``path/models``).
        progress: let :class:`~carp_fast.callbacks.RichProgress` display (it always measures
            ``learn.images_per_s``).

    Returns:
        a :class:`CARPLearner`; ``learn.fit(epochs)`` trains. Besides fastai's own, its callbacks are
        GradientAccumulation, the precision callback, OptimizerStepScheduler (lr and weight decay),
        TeacherEMA and CARPStats (``learn.carp_stats.history``).
    """
    return build_learner(
        dls, build_model(config), config, loss_func=CARPLoss(), opt_func=opt_func(config), lr=config.peak_lr(),
        method_cbs=[lr_wd_schedules(config), TeacherEMA(config.teacher_momentum), CARPStats(every=config.log_every)],
        accelerator=accelerator, cbs=cbs, path=path, progress=progress,
    )


def build_learner(
    dls, model, config, *, loss_func, opt_func, lr: float, method_cbs, accelerator=None, cbs=None,
    path: str = ".", progress: bool = True, splitter=trainable_params,
) -> CARPLearner:
    """What every method's learner shares (:func:`carp_learner`, ``carp_fast.massl.massl_learner``).

    Puts ``model`` on Accelerate's device (SyncBatchNorm and DistributedDataParallel with
    several processes, channels_last where it pays) and adds the shared callbacks: epoch sync,
    device recorder, gradient accumulation, precision and progress.

    Args:
        dls, accelerator, cbs, path, progress: as :func:`carp_learner`.
        model: the method's module (student, teacher and whatever the method keeps).
        config: the method's settings; read here: ``batch_size``, ``precision``,
            ``channels_last``, ``sync_bn``, ``accumulation_steps()``, ``resolved_precision()``.
        loss_func, opt_func, lr, splitter: as fastai's Learner.
        method_cbs: the method's callbacks (schedules, teacher update, statistics).
    """
    # One precision: the config's callbacks; an Accelerator that would autocast too is refused.
    accelerator = make_accelerator() if accelerator is None else accelerator
    check_accelerator(accelerator)
    device, n_proc = accelerator.device, accelerator.num_processes
    n_acc = config.accumulation_steps(n_proc)

    precision = config.resolved_precision(device)
    channels_last = auto_channels_last(device, precision) if config.channels_last is None else config.channels_last
    if n_proc > 1 and config.sync_bn:
        model = convert_sync_batchnorm(model, device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if n_proc > 1:
        if accelerator.ddp_handler is None:  # a caller's own DistributedDataParallelKwargs win
            from accelerate.utils import DistributedDataParallelKwargs

            # SyncBatchNorm keeps the BatchNorm statistics equal and the loss broadcasts the
            # partition: DDP's default re-broadcast of every buffer before every forward (16
            # times a step with accumulation) would only cost time.
            accelerator.ddp_handler = DistributedDataParallelKwargs(broadcast_buffers=False)
        model = accelerator.prepare_model(model)
    if all(hasattr(dl, "to") for dl in dls.loaders):
        dls.device = device  # fastai loaders move their batches themselves
    else:
        dls._device = device  # plain torch loaders: the Learner moves each batch

    callbacks = [
        TrainEvalCallback(),
        EpochSync(),
        DataWait(),
        DeviceRecorder(valid_metrics=len(dls.valid) > 0 if dls.valid is not None else False),
        GradientAccumulation(n_acc),
        *precision_callbacks(precision, device),
        *method_cbs,
    ]
    callbacks.append(RichProgress(images_per_batch=config.batch_size * n_proc, show=progress))
    learn = CARPLearner(
        dls, model, loss_func=loss_func, opt_func=opt_func, lr=lr, splitter=splitter,
        cbs=callbacks + list(cbs or []), path=path, default_cbs=False,
    )
    if channels_last:
        learn.add_cb(ChannelsLastInputs())
    learn.logger = lambda *args: None  # RichProgress prints the epoch lines instead
    learn.carp_config, learn.accelerator = config, accelerator
    return learn

