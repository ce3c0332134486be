"""The method seam: what a method of the family defines, and the settings every method shares.

CARP (:mod:`carp_fast.carp`) and MaSSL (:mod:`carp_fast.massl.method`) are each one short
module holding a :class:`MethodConfig` subclass (the method's own settings and defaults) and
a :class:`Method`: four functions of that config. Everything else exists once and serves
every method: the student/EMA-teacher pair and its forward
(:class:`carp_fast.networks.StudentTeacher`), the output type
(:class:`carp_fast.loss.BlockLogits`), the learner with devices, precision, accumulation,
DistributedDataParallel and resume (:func:`carp_fast.learner.method_learner`), the steps of
a run (:func:`carp_fast.run.pretrain`) and the export (:func:`carp_fast.export.export_backbone`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
from fastai.torch_core import trainable_params

from .backbones import ARCHITECTURES
from .callbacks.precision import PRECISIONS, auto_precision
from .options import check_all, setting
from .partition import PARTITION_MODES


@dataclass
class MethodConfig:
    """The settings every method has: backbone, partition, student/teacher, optimisation
    arithmetic, speed and logging. A method's config subclasses it, adds its own fields,
    re-declares the fields whose default differs, and extends :meth:`checks`."""

    # Model
    arch: str = setting("resnet50", f"backbone: {' | '.join(ARCHITECTURES)} (resnet18_small and resnet10_tiny for 28-64 px images)")
    block_size: int = setting(512, "B slots (prototypes or memory entries) per partition block")
    partition: str = setting("random", "random: a new partition every step | fixed: sequential blocks drawn once (the paper's ablation)")
    hidden_dim: int = setting(2048, "projection head hidden width")
    embed_dim: int = setting(256, "projection head output width D")
    global_crops: int = setting(2, "leading crops that the teacher also sees")
    teacher_batch_stats: bool = setting(True, "BatchNorm backbones: teacher on batch statistics in training, as DINO/BYOL")
    # Optimisation
    base_lr: float = setting(0.6, "peak lr per 256 images (x global_batch / 256)")
    final_lr: float = setting(0.006, "absolute lr at the end of the cosine, not scaled with the batch")
    weight_decay: float = setting(1e-6, "weight decay at the start (none on biases and 1-d parameters)")
    final_weight_decay: float | None = setting(None, "absolute weight decay at the end of its cosine; None: constant")
    batch_size: int = setting(64, "images per process per micro-batch")
    global_batch: int = setting(4096, "images per optimizer step; batch_size x processes x accumulation")
    teacher_momentum: float = setting(0.99, "teacher EMA momentum at the start; cosine to 1.0 over the fit")
    # Speed
    precision: str = setting("auto", "auto (bf16 on CUDA and on CPUs with bf16 units, else fp32) | bf16 | fp16 (autocast + GradScaler, as the official runs; slow on CPUs) | fp32")
    channels_last: bool | None = setting(None, "channels_last memory format; None: on with CUDA and on oneDNN CPUs")
    sync_bn: bool = setting(True, "BatchNorm backbones: batch statistics over all processes")
    # Logging
    log_every: int = setting(50, "batches between host syncs for the logged statistics")
    seed: int = setting(0, "seed of the partitions and of the run")

    slots_field: ClassVar[str]  # the subclass's field of K, what the partition divides into blocks

    def __post_init__(self):
        check_all(self.checks(), lambda message: f"{type(self).__name__}: {message}; got {self.describe()}")

    @property
    def n_slots(self) -> int:
        """K, what the partition divides into blocks (prototypes, memory slots)."""
        return getattr(self, self.slots_field)

    def checks(self) -> list[tuple[bool, str]]:
        """``(ok, message)`` pairs; :meth:`__post_init__` raises on the first that fails."""
        return [
            (self.arch in ARCHITECTURES, f"arch must be one of {ARCHITECTURES}"),
            (self.partition in PARTITION_MODES, f"partition must be one of {PARTITION_MODES}"),
            (self.precision in PRECISIONS + ("auto",), f"precision must be one of {PRECISIONS + ('auto',)}"),
            (self.n_slots >= 1, f"{self.slots_field} must be >= 1"),
            (1 <= self.block_size <= self.n_slots, f"block_size must be in [1, {self.slots_field}={self.n_slots}]"),
            (self.base_lr > 0, "base_lr must be > 0"),
            (0 <= self.final_lr <= self.peak_lr(), f"final_lr must be in [0, the peak lr base_lr x global_batch / 256 = {self.peak_lr():.3g}] (it is absolute: set --final-lr with a small --base-lr)"),
            (self.weight_decay >= 0 and (self.final_weight_decay or 0) >= 0, "weight decays must be >= 0"),
            (self.batch_size >= 1 and self.global_batch >= 1, "batch_size and global_batch must be >= 1"),
            (0 <= self.teacher_momentum <= 1, "teacher_momentum must be in [0, 1]"),
            (1 <= self.global_crops, "global_crops must be >= 1"),
        ]

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
        """``base_lr * global_batch / 256`` (the linear scaling rule both papers follow)."""
        return self.base_lr * self.global_batch / 256


def no_check(model, config, num_processes: int) -> None:
    """A :attr:`Method.check` with nothing to check."""


@dataclass(frozen=True)
class Method:
    """What makes a method that method, as functions of its config.

    Attributes:
        name: a short name (``"carp"``, ``"massl"``), stored with checkpoints and summaries.
        config: its :class:`MethodConfig` subclass.
        build_model: ``config -> StudentTeacher`` (student, teacher, whatever it keeps).
        loss: ``config -> module`` mapping the model's :class:`~carp_fast.loss.BlockLogits`
            (and the labels, ignored) to a scalar loss.
        optimizer: ``config -> opt_func`` for fastai's Learner.
        callbacks: ``config -> [Callback]``: its schedules, teacher update and statistics.
        splitter: fastai's splitter (parameter groups; default: one group).
        check: ``(model, config, num_processes) -> None``, raising ValueError before the
            first step when the model cannot run on this many processes.
    """

    name: str
    config: type[MethodConfig]
    build_model: Callable
    loss: Callable
    optimizer: Callable
    callbacks: Callable
    splitter: Callable = trainable_params
    check: Callable = no_check
