"""CARP on the method seam: learned prototypes, partitioned at random, and the paper's training.

Silva & Ramirez Rivera, NeurIPS 2023 (official code: github sthalles/carp). What makes CARP
CARP, and nothing else: a branch ends in K unit-vector prototypes
(:class:`~carp_fast.networks.Prototypes`) that the student and its EMA teacher share the
shape of; the loss is :class:`~carp_fast.loss.CARPLoss` (consistency plus entropy over
random blocks); it trains as the paper (appendix C.1): LARS (momentum 0.9, eta 0.001, no
weight decay or adaptation on 1-d parameters), weight decay 1e-6, learning rate
``base_lr * global_batch / 256`` with a cosine per optimizer step (no warm-up) to the
absolute ``final_lr`` (not scaled with the batch, as the official code), a teacher momentum
cosine from 0.99 to 1, and gradient accumulation toward a global batch of 4096.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from fastai.callback.schedule import SchedCos
from fastai.optimizer import OptimWrapper
from torch import Tensor

from .backbones import build_backbone
from .callbacks.carp_stats import CARPStats
from .callbacks.entropy_weight import EntropyWeightSchedule
from .callbacks.schedule import OptimizerStepScheduler
from .callbacks.teacher_ema import TeacherEMA
from .lars import lars_optimizer
from .learner import method_learner
from .loss import CARPLoss
from .method import Method, MethodConfig
from .networks import Branch, ProjectionHead, Prototypes, StudentTeacher
from .options import setting

OPTIMIZERS = ("lars", "adamw")


@dataclass
class CARPConfig(MethodConfig):
    """Settings of a CARP run. Defaults are the paper's ImageNet ResNet-50 multi-crop run."""

    slots_field = "n_prototypes"
    n_prototypes: int = setting(65536, "K, the number of prototypes")
    block_size: int = setting(512, "B prototypes per partition block (B = K: one block, which collapses)")
    optimizer: str = setting("lars", "lars (paper) | adamw (better for short, small runs)")
    base_lr: float = setting(0.6, "peak lr per 256 images (x global_batch / 256); 0.6 up to 200 epochs, 0.3 for 400 (paper C.1)")
    final_lr: float = setting(0.006, "absolute lr at the end of the cosine, not scaled with the batch; 0.006 with base 0.6, 0.003 with 0.3")
    weight_decay: float = setting(1e-6, "L2 weight decay of >1-d parameters (paper: 1e-6)")
    lars_momentum: float = setting(0.9, "LARS heavy-ball momentum")
    lars_eta: float = setting(0.001, "LARS trust coefficient")
    # The teacher and the entropy weight: the paper's are an EMA teacher and lambda_e = 1
    teacher: bool = setting(True, "an EMA teacher (paper); --no-teacher: none, the student's own outputs for the global crops, "
                                  "detached, are the targets (table B.2's 'w/o mom. enc.'; one forward less per step)")
    entropy_weight: float = setting(1.0, "lambda_e, the weight of the entropy term (paper: 1); its start with --final-entropy-weight")
    final_entropy_weight: float | None = setting(None, "lambda_e at the end of its cosine over the fit; None: constant")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.optimizer in OPTIMIZERS, f"optimizer must be one of {OPTIMIZERS}"),
            (self.entropy_weight >= 0 and (self.final_entropy_weight or 0) >= 0, "entropy weights must be >= 0"),
        ]


class CARPNetwork(Branch):
    """backbone -> head -> prototypes for one branch (student or teacher)."""

    def __init__(self, arch: str = "resnet50", n_prototypes: int = 65536, hidden_dim: int = 2048, embed_dim: int = 256):
        backbone = build_backbone(arch)
        super().__init__(backbone, ProjectionHead(backbone.feature_dim, hidden_dim, embed_dim))
        self.prototypes = Prototypes(embed_dim, n_prototypes)


class CARPStudentTeacher(StudentTeacher):
    """CARP's student and EMA teacher: each branch scores its embeddings against its own
    prototypes, arranged by the step's partition.

    Args:
        arch: backbone architecture (see :func:`carp_fast.backbones.build_backbone`).
        n_prototypes: K.
        hidden_dim, embed_dim: projection head widths.
        block_size, partition, global_crops, seed, teacher_batch_stats: as
            :class:`~carp_fast.networks.StudentTeacher`.
        teacher: False: no teacher network (``ema_teacher=False`` of
            :class:`~carp_fast.networks.StudentTeacher`; CARL, :mod:`carp_fast.carl`).
    """

    def __init__(self, arch: str = "resnet50", n_prototypes: int = 65536, block_size: int = 512, partition: str = "random",
                 global_crops: int = 2, hidden_dim: int = 2048, embed_dim: int = 256, seed: int = 0,
                 teacher_batch_stats: bool = True, teacher: bool = True):
        super().__init__(
            CARPNetwork(arch, n_prototypes, hidden_dim, embed_dim), n_slots=n_prototypes, block_size=block_size,
            partition=partition, global_crops=global_crops, seed=seed, teacher_batch_stats=teacher_batch_stats,
            ema_teacher=teacher,
        )

    def block_logits(self, branch: CARPNetwork, z: Tensor, partition: Tensor) -> Tensor:
        return branch.prototypes.block_logits(z, partition)  # [M, P, B], float32


def build_model(config: CARPConfig) -> CARPStudentTeacher:
    """The student/teacher pair described by ``config``."""
    return CARPStudentTeacher(
        arch=config.arch, n_prototypes=config.n_prototypes, block_size=config.block_size, partition=config.partition,
        global_crops=config.global_crops, hidden_dim=config.hidden_dim, embed_dim=config.embed_dim, seed=config.seed,
        teacher_batch_stats=config.teacher_batch_stats, teacher=config.teacher,
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


def callbacks(config: CARPConfig) -> list:
    """The lr and weight-decay cosines, the teacher's EMA (none with ``teacher=False``), the
    lambda_e cosine (with ``final_entropy_weight``) and CARP's statistics (``learn.carp_stats``)."""
    cbs = [lr_wd_schedules(config)]
    if config.teacher:
        cbs.append(TeacherEMA(config.teacher_momentum))
    if config.final_entropy_weight is not None:
        cbs.append(EntropyWeightSchedule(config.entropy_weight, config.final_entropy_weight))
    return cbs + [CARPStats(every=config.log_every)]


def loss(config: CARPConfig) -> CARPLoss:
    """CARP's loss with lambda_e = ``config.entropy_weight`` (a schedule moves it with ``final_entropy_weight``)."""
    return CARPLoss(entropy_weight=config.entropy_weight)


CARP = Method(name="carp", config=CARPConfig, build_model=build_model, loss=loss, optimizer=opt_func, callbacks=callbacks)


def carp_learner(dls, config: CARPConfig, **kwargs):
    """:func:`carp_fast.learner.method_learner` for CARP: a Learner that trains CARP on ``dls``.

    ``learn.fit(epochs)`` trains; besides the shared callbacks, it has the lr and weight-decay
    schedules, TeacherEMA and CARPStats (``learn.carp_stats.history``).
    """
    return method_learner(CARP, dls, config, **kwargs)
