"""A fastai Learner for MaSSL, built by the same function as CARP's.

:func:`massl_learner` trains as the published runs (official README of sthalles/MaSSL):
AdamW, lr ``base_lr * global_batch / 256`` (5e-4 for ViT-S; 7.5e-4 with 10 warm-up epochs
for ViT-B) with a cosine to an absolute ``final_lr`` (1e-6), weight decay cosine 0.04 -> 0.4
(none on biases and 1-d parameters), each parameter's gradient clipped to norm 3, teacher
momentum 0.992 (ViT-S) / 0.996 (ViT-B) cosine to 1, student temperature 0.1 and teacher
temperature 0.04 -> 0.07 over the first 30 epochs. Everything around the method (devices,
DistributedDataParallel, precision, accumulation, progress) is
:func:`carp_fast.learner.build_learner`'s, shared with CARP.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial

import torch
from fastai.callback.schedule import SchedCos, sched_cos
from fastai.optimizer import OptimWrapper

from ..callbacks.precision import PRECISIONS
from ..callbacks.schedule import OptimizerStepScheduler, schedule_length
from ..callbacks.teacher_ema import TeacherEMA
from ..learner import CARPConfig, CARPLearner, build_learner, setting
from ..partition import PARTITION_MODES
from .clipping import ClipGradPerParameter
from .loss import MaSSLLoss
from .networks import ARCHITECTURES, MaSSLStudentTeacher, build_backbone
from .stats import MaSSLStats
from .temperature import TeacherTemperatureWarmup


@dataclass
class MaSSLConfig:
    """Settings of a MaSSL run. Defaults: ViT-S/16 as published (batch 128, 2 GPUs x 64)."""

    # Model
    arch: str = setting("vit_small", f"backbone: {' | '.join(ARCHITECTURES)}")
    memory_size: int = setting(65536, "K, memory slots (131,072 in the published runs); a multiple of batch_size x processes")
    block_size: int = setting(1024, "B memory slots per partition block (16,384 of 131,072 in the published runs)")
    partition: str = setting("random", "random: new partition every step | fixed: sequential blocks")
    hidden_dim: int = setting(2048, "head hidden width")
    embed_dim: int = setting(256, "head output width D (and the memory's)")
    global_crops: int = setting(2, "leading crops that the teacher also sees; the second is written to the memory")
    drop_path: float = setting(0.1, "student stochastic depth (ViTs; the teacher's is 0)")
    teacher_batch_stats: bool = setting(True, "BatchNorm backbones: teacher on batch statistics")
    # Objective
    student_temperature: float = setting(0.1, "tau_s")
    teacher_temperature: float = setting(0.07, "tau_t after the warm-up; above 0.07 is unstable (official help)")
    warmup_teacher_temperature: float = setting(0.04, "tau_t at the start; lower it if the loss does not decrease")
    teacher_temperature_epochs: float = setting(30, "epochs of the linear tau_t warm-up (ViT-S 30, ViT-B 50)")
    # Optimisation
    base_lr: float = setting(5e-4, "AdamW lr per 256 images (ViT-S 5e-4, ViT-B 7.5e-4)")
    final_lr: float = setting(1e-6, "absolute lr at the end of the cosine, not scaled with the batch (ViT-B: 2e-6)")
    warmup_epochs: float = setting(0, "linear lr warm-up from 0 (ViT-S 0, ViT-B 10)")
    weight_decay: float = setting(0.04, "AdamW weight decay at the start (none on biases and 1-d parameters)")
    final_weight_decay: float = setting(0.4, "weight decay at the end of its cosine")
    clip_grad: float = setting(3.0, "clip each parameter's gradient to this L2 norm (0: off)")
    batch_size: int = setting(64, "images per process per micro-batch")
    global_batch: int = setting(128, "images per optimizer step; batch_size x processes x accumulation")
    teacher_momentum: float = setting(0.992, "teacher EMA momentum at the start, cosine to 1 (ViT-S 0.992, ViT-B 0.996)")
    # Speed
    precision: str = setting("auto", "auto (bf16 on CUDA and on CPUs with bf16 units, else fp32) | bf16 | fp16 (autocast + GradScaler, as the official runs) | fp32")
    channels_last: bool | None = setting(None, "channels_last memory format; None: on with CUDA or bf16")
    sync_bn: bool = setting(True, "BatchNorm backbones: batch statistics over all processes")
    # Logging
    log_every: int = setting(50, "batches between host syncs for the logged statistics")
    seed: int = setting(0, "seed of the partitions, the initial memory and the run")

    def __post_init__(self):
        checks = [
            (self.arch in ARCHITECTURES, f"arch must be one of {ARCHITECTURES}"),
            (self.partition in PARTITION_MODES, f"partition must be one of {PARTITION_MODES}"),
            (self.precision in PRECISIONS + ("auto",), f"precision must be one of {PRECISIONS + ('auto',)}"),
            (1 <= self.block_size <= self.memory_size, f"block_size must be in [1, memory_size={self.memory_size}]"),
            (self.global_crops >= 2, "global_crops must be >= 2 (the second global crop is written to the memory)"),
            (self.student_temperature > 0 and self.teacher_temperature > 0 and self.warmup_teacher_temperature > 0, "temperatures must be > 0"),
            (self.base_lr > 0 and 0 <= self.final_lr <= self.peak_lr(), "base_lr must be > 0 and final_lr in [0, the peak lr base_lr x global_batch / 256]"),
            (self.warmup_epochs >= 0 and self.teacher_temperature_epochs >= 0, "warm-up epochs must be >= 0"),
            (self.weight_decay >= 0 and self.final_weight_decay >= 0, "weight decays must be >= 0"),
            (self.clip_grad >= 0, "clip_grad must be >= 0"),
            (self.batch_size >= 1 and self.global_batch >= 1, "batch_size and global_batch must be >= 1"),
            (0 <= self.teacher_momentum <= 1, "teacher_momentum must be in [0, 1]"),
            (0 <= self.drop_path < 1, "drop_path must be in [0, 1)"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"MaSSLConfig: {message}; got {self.describe()}")

    # The same arithmetic as CARP's settings.
    describe = CARPConfig.describe
    to_dict = CARPConfig.to_dict
    accumulation_steps = CARPConfig.accumulation_steps
    resolved_precision = CARPConfig.resolved_precision
    peak_lr = CARPConfig.peak_lr


def build_massl_model(config: MaSSLConfig) -> MaSSLStudentTeacher:
    """The student, teacher and memory described by ``config``."""
    return MaSSLStudentTeacher(
        partial(build_backbone, config.arch),
        memory_size=config.memory_size,
        block_size=config.block_size,
        partition=config.partition,
        global_crops=config.global_crops,
        hidden_dim=config.hidden_dim,
        embed_dim=config.embed_dim,
        drop_path=config.drop_path,
        seed=config.seed,
        teacher_batch_stats=config.teacher_batch_stats,
    )


def decay_groups(model: torch.nn.Module) -> list[list[torch.nn.Parameter]]:
    """Trainable parameters in two groups: [weight-decayed, not decayed (biases and 1-d)].

    The official ``get_params_groups``: a name ending in ``.bias`` or a 1-d tensor (norm
    weights) gets no weight decay. A fastai splitter.
    """
    decayed, not_decayed = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (not_decayed if name.endswith(".bias") or p.ndim == 1 else decayed).append(p)
    return [decayed, not_decayed]


class MaSSLSchedules(OptimizerStepScheduler):
    """The lr (linear warm-up in epochs, then cosine) and weight-decay (cosine) schedules.

    Per optimizer step as CARP's. The warm-up is the official ``np.linspace(0, peak, W)``
    over its ``W = warmup_epochs x micro-batches per epoch`` iterations, so its last
    iteration has the peak. The second parameter group (biases, 1-d) keeps weight decay 0.
    """

    name = "massl_schedules"

    def __init__(self, config: MaSSLConfig):
        self.config = config
        wd = SchedCos(config.weight_decay, config.final_weight_decay)
        super().__init__({"lr": self.learning_rate, "wd": lambda pct: [wd(pct), 0.0]})  # one value per parameter group

    def learning_rate(self, pct: float) -> float:
        """The official ``cosine_scheduler`` with warm-up, at progress ``pct`` of :func:`step_progress`."""
        c, peak = self.config, self.config.peak_lr()
        total = schedule_length(self.learn)  # T micro-batches
        it = round(pct * total)  # the micro-batch index that pct stands for
        warmup = min(round(c.warmup_epochs * self.learn.n_iter), total)  # W
        if it < warmup:
            return peak * it / (warmup - 1) if warmup > 1 else 0.0  # np.linspace(0, peak, W)[it]
        return sched_cos(peak, c.final_lr, (it - warmup) / max(total - warmup, 1))

def massl_learner(dls, config: MaSSLConfig, *, accelerator=None, cbs=None, path: str = ".", progress: bool = True, model=None):
    """A fastai Learner that trains MaSSL on ``dls``; the counterpart of ``carp_learner``.

    Args:
        dls: fastai ``DataLoaders`` of ``(crop_0, ..., crop_{V-1}, labels)``, the global
            crops first (``carp_fast.pipelines.crop_dataloaders``).
        config: the run's settings.
        accelerator, cbs, path, progress: as :func:`carp_fast.learner.carp_learner`.
        model: a :class:`~carp_fast.massl.networks.MaSSLStudentTeacher` to train instead of
            the one ``config`` describes (another backbone); its memory size must match.

    Returns:
        a :class:`~carp_fast.learner.CARPLearner` (resumable); besides the shared callbacks,
        MaSSLSchedules, TeacherTemperatureWarmup, ClipGradPerParameter, TeacherEMA and MaSSLStats
        (``learn.massl_stats.history``).

    Raises:
        ValueError: the memory size is not a multiple of ``batch_size x processes``.
    """
    model = build_massl_model(config) if model is None else model
    if accelerator is None:
        from accelerate import Accelerator

        accelerator = Accelerator(cpu=not torch.cuda.is_available())
    model.memory.check_batch(config.batch_size * accelerator.num_processes)  # before the first step
    method_cbs = [
        MaSSLSchedules(config),
        TeacherTemperatureWarmup(config.warmup_teacher_temperature, config.teacher_temperature, config.teacher_temperature_epochs),
        TeacherEMA(config.teacher_momentum),
        MaSSLStats(every=config.log_every),
    ]
    if config.clip_grad > 0:
        method_cbs.append(ClipGradPerParameter(config.clip_grad))
    loss = MaSSLLoss(config.student_temperature, config.warmup_teacher_temperature)
    opt_func = partial(OptimWrapper, opt=partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-8))
    learn: CARPLearner = build_learner(
        dls, model, config, loss_func=loss, opt_func=opt_func, lr=config.peak_lr(), method_cbs=method_cbs,
        accelerator=accelerator, cbs=cbs, path=path, progress=progress, splitter=decay_groups,
    )
    learn.massl_config = config
    return learn
