"""MaSSL on the method seam: a memory of past teacher embeddings in place of prototypes.

Silva & Ramirez Rivera, "Learning from Memory", ICML 2024 (official code: ``head.py``,
``memory_bank.py``, ``main_massl.py`` of github sthalles/MaSSL). What makes MaSSL MaSSL, and
nothing else: the head ends in a unit vector with no BatchNorm (:func:`massl_head`); both
branches score against one FIFO :class:`~carp_fast.massl.memory.Memory` of teacher
embeddings, written after each step's logits with the second global view; the loss is
:class:`~carp_fast.massl.loss.MaSSLLoss` (temperatures, no entropy term); it trains as the
published runs: AdamW, lr ``base_lr * global_batch / 256`` (5e-4 for ViT-S; 7.5e-4 with 10
warm-up epochs for ViT-B) with a cosine to an absolute ``final_lr`` (1e-6), weight decay
cosine 0.04 -> 0.4 (none on biases and 1-d parameters), each parameter's gradient clipped to
norm 3, teacher momentum 0.992 (ViT-S) / 0.996 (ViT-B) cosine to 1, student temperature 0.1
and teacher temperature 0.04 -> 0.07 over the first 30 epochs.

Dimension letters: V views, N images, D embedding, K memory slots, P blocks, B slots per block.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable

import torch
import torch.nn as nn
from fastai.callback.schedule import SchedCos, sched_cos
from fastai.optimizer import OptimWrapper
from torch import Tensor

from ..backbones import build_backbone
from ..callbacks.schedule import OptimizerStepScheduler, schedule_length
from ..callbacks.teacher_ema import TeacherEMA
from ..learner import method_learner
from ..method import Method, MethodConfig
from ..networks import Branch, ProjectionHead, StudentTeacher
from ..options import setting
from .clipping import ClipGradPerParameter
from .loss import MaSSLLoss
from .memory import Memory
from .stats import MaSSLStats
from .temperature import TeacherTemperatureWarmup


@dataclass
class MaSSLConfig(MethodConfig):
    """Settings of a MaSSL run. Defaults: ViT-S/16 as published (batch 128, 2 GPUs x 64)."""

    slots_field = "memory_size"
    arch: str = setting("vit_small", "backbone: vit_small | vit_base (timm ViT/16), vit_mini_p2 (10-28 px images) or a ResNet of carp_fast.backbones")
    memory_size: int = setting(65536, "K, memory slots (131,072 in the published runs); a multiple of batch_size x processes")
    block_size: int = setting(1024, "B memory slots per partition block (16,384 of 131,072 in the published runs)")
    global_crops: int = setting(2, "leading crops that the teacher also sees; the second is written to the memory")
    drop_path: float = setting(0.1, "student stochastic depth (ViTs; the teacher's is 0)")
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
    global_batch: int = setting(128, "images per optimizer step; batch_size x processes x accumulation")
    teacher_momentum: float = setting(0.992, "teacher EMA momentum at the start, cosine to 1 (ViT-S 0.992, ViT-B 0.996)")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.global_crops >= 2, "global_crops must be >= 2 (the second global crop is written to the memory)"),
            (min(self.student_temperature, self.teacher_temperature, self.warmup_teacher_temperature) > 0, "temperatures must be > 0"),
            (self.warmup_epochs >= 0 and self.teacher_temperature_epochs >= 0, "warm-up epochs must be >= 0"),
            (self.clip_grad >= 0, "clip_grad must be >= 0"),
            (0 <= self.drop_path < 1, "drop_path must be in [0, 1)"),
        ]


def massl_head(in_dim: int, hidden_dim: int = 2048, out_dim: int = 256) -> ProjectionHead:
    """MaSSL's head (official ``head.py``): 3 Linear + GELU, no BatchNorm, unit-length output."""
    return ProjectionHead(in_dim, hidden_dim, out_dim, batch_norm=False, unit_output=True)


class MaSSLStudentTeacher(StudentTeacher):
    """MaSSL's student, EMA teacher and memory: both branches score against the memory, and
    each training forward *then* writes the teacher embeddings of the second global view (all
    ranks gathered) at the memory's pointer, as the official code does. Evaluation forwards
    leave the memory alone.

    Args:
        arch: backbone, a name of :data:`carp_fast.backbones.ARCHITECTURES` (ViTs or ResNets)
            or a function ``drop_path -> module`` with ``feature_dim`` (another backbone).
        memory_size: K.
        block_size: B, memory slots per partition block (official: 1,024; 16,384 of 131,072
            in the published runs).
        global_crops: leading crops that the teacher sees (>= 2: the second is written).
        hidden_dim, embed_dim: head widths.
        drop_path: the student's stochastic depth (ViTs; the teacher's is 0).
        seed: seed of the partition sampler and of the initial memory.
        partition, teacher_batch_stats: as :class:`~carp_fast.networks.StudentTeacher`.
    """

    def __init__(self, arch: str | Callable[[float], nn.Module] = "vit_small", memory_size: int = 65536, block_size: int = 1024, partition: str = "random",
                 global_crops: int = 2, hidden_dim: int = 2048, embed_dim: int = 256, drop_path: float = 0.1,
                 seed: int = 0, teacher_batch_stats: bool = True):
        if global_crops < 2:
            raise ValueError(f"MaSSL writes the second global crop to the memory: global_crops must be >= 2, got {global_crops}")
        backbone = arch if callable(arch) else partial(build_backbone, arch)
        student, teacher = (Branch(b, massl_head(b.feature_dim, hidden_dim, embed_dim)) for b in (backbone(drop_path), backbone(0.0)))
        super().__init__(student, teacher, n_slots=memory_size, block_size=block_size, partition=partition,
                         global_crops=global_crops, seed=seed, teacher_batch_stats=teacher_batch_stats)
        # Every rank writes the same all-gathered rows, so the memory needs no DDP buffer
        # broadcast (carp_fast.learner.method_learner wraps with broadcast_buffers=False).
        self.memory = Memory(memory_size, embed_dim, seed=seed)

    def block_logits(self, branch: Branch, z: Tensor, partition: Tensor) -> Tensor:
        return self.memory.block_logits(z, partition)  # [M, P, B], float32

    def after_logits(self, teacher_embeddings: Tensor, n_images: int) -> None:
        self.memory.write(teacher_embeddings[n_images : 2 * n_images])  # the second global view


def build_model(config: MaSSLConfig) -> MaSSLStudentTeacher:
    """The student, teacher and memory described by ``config``."""
    return MaSSLStudentTeacher(
        arch=config.arch, memory_size=config.memory_size, block_size=config.block_size, partition=config.partition,
        global_crops=config.global_crops, hidden_dim=config.hidden_dim, embed_dim=config.embed_dim,
        drop_path=config.drop_path, seed=config.seed, teacher_batch_stats=config.teacher_batch_stats,
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


def callbacks(config: MaSSLConfig) -> list:
    """The lr and weight-decay schedules, the tau_t warm-up, the teacher's EMA, MaSSL's
    statistics (``learn.massl_stats``) and, with ``clip_grad``, the per-parameter clipping."""
    cbs = [
        MaSSLSchedules(config),
        TeacherTemperatureWarmup(config.warmup_teacher_temperature, config.teacher_temperature, config.teacher_temperature_epochs),
        TeacherEMA(config.teacher_momentum),
        MaSSLStats(every=config.log_every),
    ]
    return cbs + ([ClipGradPerParameter(config.clip_grad)] if config.clip_grad > 0 else [])


def check_memory(model, config: MaSSLConfig, num_processes: int) -> None:
    """Each step writes ``batch_size x processes`` rows: they must divide the memory."""
    getattr(model, "module", model).memory.check_batch(config.batch_size * num_processes)


def opt_func(config: MaSSLConfig):
    """AdamW (betas 0.9 / 0.999, eps 1e-8), the official optimiser; lr and weight decay come from the schedules."""
    return partial(OptimWrapper, opt=partial(torch.optim.AdamW, betas=(0.9, 0.999), eps=1e-8))


MASSL = Method(
    name="massl", config=MaSSLConfig, build_model=build_model,
    loss=lambda config: MaSSLLoss(config.student_temperature, config.warmup_teacher_temperature),
    optimizer=opt_func,
    callbacks=callbacks, splitter=decay_groups, check=check_memory,
)


def massl_learner(dls, config: MaSSLConfig, **kwargs):
    """:func:`carp_fast.learner.method_learner` for MaSSL: a Learner that trains MaSSL on ``dls``.

    ``model=`` trains another :class:`MaSSLStudentTeacher` (its memory size must match).
    Besides the shared callbacks: MaSSLSchedules, TeacherTemperatureWarmup,
    ClipGradPerParameter, TeacherEMA and MaSSLStats (``learn.massl_stats.history``).

    Raises:
        ValueError: the memory size is not a multiple of ``batch_size x processes``.
    """
    return method_learner(MASSL, dls, config, **kwargs)
