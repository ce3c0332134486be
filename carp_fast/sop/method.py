"""SOP on the method seam: prototypes organised each step from a memory of teacher embeddings.

Silva, Pedrini & Ramirez Rivera, "Self-Organizing Visual Prototypes for Non-Parametric
Representation Learning", ICML 2025 (official code: github sthalles/sop, built on iBOT). What
makes SOP SOP, and nothing else: MaSSL's FIFO memory of teacher embeddings (the second global
view, all ranks gathered) and unit-length head; each step T tasks of anchors drawn from the
memory, each anchor with its nearest neighbours in the rest of the memory, voting for it
(:mod:`carp_fast.sop.prototypes`); the cross-entropy between views of their distributions over
those prototypes (:mod:`carp_fast.sop.loss`). It trains as MaSSL and iBOT do (AdamW with
warm-up and cosine, weight decay 0.04 -> 0.4, per-parameter clipping at 3, EMA teacher), so
its settings extend :class:`~carp_fast.massl.MaSSLConfig`. The [CLS] loss runs with any
backbone (ViTs: the class token; ResNets: the pooled features); with a ViT, SOP-MIM adds the
patch-token loss (:mod:`carp_fast.sop.mim`): a second memory of teacher patch embeddings, the
student's global crops block-masked.

Dimension letters: V views, N images, D embedding, K memory slots, T tasks, P anchors drawn
per task, P' anchors kept (SOPs), k supports per SOP, S = P' k supports per task.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Sequence

import torch
import torch.nn as nn
from torch import Tensor

from ..backbones import build_backbone
from ..callbacks.teacher_ema import TeacherEMA
from ..learner import method_learner
from ..massl.clipping import ClipGradPerParameter
from ..massl.memory import Memory
from ..massl.method import MaSSLConfig, MaSSLSchedules, check_memory, decay_groups, massl_head, opt_func
from ..massl.stats import MaSSLStats
from ..massl.temperature import TeacherTemperatureWarmup
from ..method import Method
from ..networks import Branch, StudentTeacher, full_precision_matmul
from ..options import setting
from .loss import SOPLoss, SOPMIMOutputs, SOPOutputs
from .mim import block_masks, vit_tokens
from .prototypes import SELECTIONS, AnchorSampler, build_tasks


@dataclass
class SOPConfig(MaSSLConfig):
    """Settings of an SOP run. Defaults: the official ViT-S/16 [CLS] settings (DESIGN section 11)."""

    memory_size: int = setting(65536, "K, [CLS] memory slots; a multiple of batch_size x processes")
    block_size: int = setting(64, "P, anchors drawn per task (the pool is the rest of the memory)")
    tasks: int = setting(4, "T, tasks of anchors per step (the loss is their mean)")
    sops: int = setting(32, "P', anchors of a task kept as prototypes (SOPs); <= block_size")
    neighbours: int = setting(9, "k, supports per SOP: the anchor and its k - 1 nearest neighbours in the pool")
    vote_smoothing: float = setting(0.1, "eps: an anchor votes 1 - eps for itself, a neighbour its cosine (>= 0)")
    anchor_selection: str = setting("uniform", f"which anchors are kept: {' | '.join(SELECTIONS)} (by the spread of their neighbours' scores)")
    teacher_temperature: float = setting(0.04, "tau_t after the warm-up (official: 0.04)")
    warmup_teacher_temperature: float = setting(0.04, "tau_t at the start (official: 0.04, so no warm-up)")
    warmup_epochs: float = setting(10, "linear lr warm-up from 0 (official: 10)")
    teacher_momentum: float = setting(0.996, "teacher EMA momentum at the start, cosine to 1 (official: 0.996)")
    batch_size: int = setting(128, "images per process per micro-batch (official: 128 per GPU)")
    # SOP-MIM (ViTs only)
    mim: bool = setting(True, "SOP-MIM on a ViT's patch tokens (ResNets: the [CLS] loss alone)")
    patch_memory_size: int = setting(8192, "patch memory slots (one teacher patch token per image written per step)")
    patch_anchors: int = setting(512, "anchors of the one patch task, each its own SOP (k = 1)")
    mask_ratio: float = setting(0.3, "fraction of each student global crop's patches block-masked")
    koleo_weight: float = setting(0.0, "weight of the KoLeo term on the student's global-crop embeddings (official: 0)")

    def checks(self) -> list[tuple[bool, str]]:
        return super().checks() + [
            (self.partition == "random", "partition must be 'random' (SOP draws new anchors every step)"),
            (self.tasks >= 1, "tasks must be >= 1"),
            (2 <= self.sops <= self.block_size, "sops must be in [2, block_size] (the anchors kept out of those drawn)"),
            (self.neighbours >= 1, "neighbours must be >= 1 (the anchor itself)"),
            (self.block_size + self.neighbours - 1 <= self.memory_size, "the memory must hold block_size anchors and neighbours - 1 neighbours"),
            (0 <= self.vote_smoothing < 1, "vote_smoothing must be in [0, 1)"),
            (self.anchor_selection in SELECTIONS, f"anchor_selection must be one of {SELECTIONS}"),
            (self.anchor_selection != "spread" or self.neighbours >= 3, "anchor_selection 'spread' needs neighbours >= 3 (a spread of >= 2 scores)"),
            (2 <= self.patch_anchors < self.patch_memory_size, "patch_anchors must be in [2, patch_memory_size)"),
            (0 < self.mask_ratio < 1, "mask_ratio must be in (0, 1)"),
            (self.koleo_weight >= 0, "koleo_weight must be >= 0"),
        ]


class SOPStudentTeacher(StudentTeacher):
    """SOP's student, EMA teacher, [CLS] memory and anchor sampler.

    Each forward draws T tasks of anchors (:class:`~carp_fast.sop.prototypes.AnchorSampler`),
    builds their supports and votes from the memory, scores student and teacher embeddings
    against a copy of the supports, and then, in training, writes the teacher embeddings of
    the second global view to the memory: the write cannot change what the step's loss uses.

    Args:
        arch: a name of :data:`carp_fast.backbones.ARCHITECTURES` or ``drop_path -> module``
            with ``feature_dim``.
        memory_size: K.
        tasks, anchors, sops, neighbours: T, P, P' and k.
        smoothing: eps of the votes.
        selection: ``"uniform"`` or ``"spread"`` (:func:`~carp_fast.sop.prototypes.keep_anchors`).
        global_crops: leading crops that the teacher sees (>= 2: the second is written).
        hidden_dim, embed_dim: head widths.
        drop_path: the student's stochastic depth (ViTs; the teacher's is 0).
        seed: seed of the anchor sampler and of the initial memory.
        teacher_batch_stats: as :class:`~carp_fast.networks.StudentTeacher`.
        mim: SOP-MIM, where the backbone is a timm ViT (else ignored: ``self.mim`` says).
        patch_memory_size, patch_anchors, mask_ratio: SOP-MIM's memory, anchors and masking.
    """

    def __init__(self, arch: str | Callable[[float], nn.Module] = "vit_small", memory_size: int = 65536, tasks: int = 4,
                 anchors: int = 64, sops: int = 32, neighbours: int = 9, smoothing: float = 0.1, selection: str = "uniform",
                 global_crops: int = 2, hidden_dim: int = 2048, embed_dim: int = 256, drop_path: float = 0.1, seed: int = 0,
                 teacher_batch_stats: bool = True, mim: bool = True, patch_memory_size: int = 8192,
                 patch_anchors: int = 512, mask_ratio: float = 0.3):
        if global_crops < 2:
            raise ValueError(f"SOP writes the second global crop to the memory: global_crops must be >= 2, got {global_crops}")
        backbone = arch if callable(arch) else partial(build_backbone, arch)
        student, teacher = (Branch(b, massl_head(b.feature_dim, hidden_dim, embed_dim)) for b in (backbone(drop_path), backbone(0.0)))
        super().__init__(student, teacher, n_slots=memory_size, block_size=anchors, global_crops=global_crops, seed=seed,
                         teacher_batch_stats=teacher_batch_stats)
        del self.partitioner  # SOP draws anchors, not a partition
        self.sops, self.neighbours, self.smoothing, self.selection = sops, neighbours, smoothing, selection
        self.memory = Memory(memory_size, embed_dim, seed=seed)  # every rank writes the same gathered rows
        self.anchor_sampler = AnchorSampler(memory_size, tasks, anchors, seed=seed)
        self.mim, self.mask_ratio = mim and hasattr(self.student.backbone, "patch_embed"), mask_ratio
        if self.mim:  # the mask token lives here, outside the backbones: their keys and the EMA pairs stay as they are
            self.mask_token = nn.Parameter(torch.zeros(self.student.backbone.embed_dim))
            self.patch_memory = Memory(patch_memory_size, embed_dim, seed=seed + 1)
            self.patch_sampler = AnchorSampler(patch_memory_size, 1, patch_anchors, seed=seed + 1)

    @torch.no_grad()
    def tasks(self, device: torch.device, patches: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """This step's ``(supports [T, S], votes [T, S, P'], support embeddings [T*S, D])`` of the
        [CLS] memory (or, ``patches``, of the patch memory: one task, k = 1, every anchor kept),
        the embeddings a copy of the memory's rows (later writes do not touch them)."""
        memory, sampler = (self.patch_memory, self.patch_sampler) if patches else (self.memory, self.anchor_sampler)
        anchors = sampler(device)  # [T, P]
        kept, neighbours, selection = (anchors.shape[1], 1, "uniform") if patches else (self.sops, self.neighbours, self.selection)
        supports, votes = build_tasks(memory.embeddings, anchors, kept=kept, neighbours=neighbours, smoothing=self.smoothing,
                                      selection=selection, generator=sampler.generator(device))
        return supports, votes, memory.embeddings.index_select(0, supports.flatten())

    def embed_with_patches(self, crops: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """SOP-MIM's forward of both ViTs: ``(z [V_s*N, D], w [V_t*N, D], student patches
        [V_t*N, L, D], teacher patches [V_t*N, L, D] (no gradient), mask [V_t*N, L])``; the
        student's global crops block-masked, its local crops as :meth:`Branch.embed`."""
        images = torch.cat(crops[: self.global_crops])  # [V_t*N, 3, H, W]
        patch = self.student.backbone.patch_embed.patch_size
        h, w = images.shape[-2] // patch[0], images.shape[-1] // patch[1]
        mask = block_masks(images.shape[0], h, w, self.mask_ratio).to(images.device)  # [V_t*N, h, w]
        cls, tokens = vit_tokens(self.student.backbone, images, mask, self.mask_token)  # [V_t*N, C], [V_t*N, L, C]
        z, z_patches = self.student.head(cls), self.student.head(tokens)
        if len(crops) > self.global_crops:
            z = torch.cat([z, self.student.embed(crops[self.global_crops :])])  # [V_s*N, D]
        with torch.no_grad():
            cls, tokens = vit_tokens(self.teacher.backbone, images)
            w, w_patches = self.teacher.head(cls), self.teacher.head(tokens)
        return z, w, z_patches, w_patches, mask.flatten(1)

    def forward(self, *crops: Tensor) -> SOPOutputs | SOPMIMOutputs:
        """One step's cosines to the supports.

        Args:
            crops: V_s tensors ``[N, 3, H, W]``, the ``global_crops`` global ones first.

        Returns:
            :class:`~carp_fast.sop.loss.SOPOutputs`: student ``[V_s, N, T, S]`` and teacher
            ``[V_t, N, T, S]`` cosines (float32), supports ``[T, S]`` and votes ``[T, S, P']``;
            with SOP-MIM a :class:`~carp_fast.sop.loss.SOPMIMOutputs`, with the patch parts too.
        """
        if len(crops) < self.global_crops:
            raise ValueError(f"expected at least {self.global_crops} crops (the global ones), got {len(crops)}")
        n_images, n_global = crops[0].shape[0], self.global_crops
        if self.mim:
            z, w, z_patches, w_patches, mask = self.embed_with_patches(crops)
        else:
            z = self.student.embed(crops)  # [V_s*N, D]
            with torch.no_grad():
                w = self.teacher.embed(crops[:n_global])  # [V_t*N, D]
        supports, votes, rows = self.tasks(z.device)  # [T, S], [T, S, P'], [T*S, D]
        s = full_precision_matmul(z, rows.t())  # [V_s*N, T*S]
        with torch.no_grad():
            t = full_precision_matmul(w, rows.t())  # [V_t*N, T*S]
        patch_parts = ()
        if self.mim:
            patch_supports, patch_votes, patch_rows = self.tasks(z.device, patches=True)  # [1, S_p], [1, S_p, S_p], [S_p, D]
            shape = (n_global, n_images, mask.shape[1], *patch_supports.shape)  # [V_t, N, L, 1, S_p]
            s_patches = full_precision_matmul(z_patches.flatten(0, 1), patch_rows.t()).view(shape)
            with torch.no_grad():
                t_patches = full_precision_matmul(w_patches.flatten(0, 1), patch_rows.t()).view(shape)
            patch_parts = (s_patches, t_patches, patch_votes, mask.view(shape[:3]))
        if self.training:  # the second global view, after the supports were read
            with torch.no_grad():
                self.memory.write(w[n_images : 2 * n_images])
                if self.mim:  # one random patch token per image
                    second = w_patches[n_images : 2 * n_images]  # [N, L, D]
                    picked = torch.randint(second.shape[1], (n_images,), device=second.device)
                    self.patch_memory.write(second[torch.arange(n_images, device=second.device), picked])
        return (SOPMIMOutputs if self.mim else SOPOutputs)(
            s.view(len(crops), n_images, *supports.shape),  # [V_s, N, T, S]
            t.view(n_global, n_images, *supports.shape),  # [V_t, N, T, S]
            supports, votes, z[: n_global * n_images].view(n_global, n_images, -1),  # [V_t, N, D]
            *patch_parts,
        )


def build_model(config: SOPConfig) -> SOPStudentTeacher:
    """The student, teacher, memory and anchor sampler described by ``config``."""
    return SOPStudentTeacher(
        arch=config.arch, memory_size=config.memory_size, tasks=config.tasks, anchors=config.block_size, sops=config.sops,
        neighbours=config.neighbours, smoothing=config.vote_smoothing, selection=config.anchor_selection,
        global_crops=config.global_crops, hidden_dim=config.hidden_dim, embed_dim=config.embed_dim,
        drop_path=config.drop_path, seed=config.seed, teacher_batch_stats=config.teacher_batch_stats, mim=config.mim,
        patch_memory_size=config.patch_memory_size, patch_anchors=config.patch_anchors, mask_ratio=config.mask_ratio,
    )


def check_memories(model, config: SOPConfig, num_processes: int) -> None:
    """Each step writes ``batch_size x processes`` rows to each memory: they must divide it."""
    check_memory(model, config, num_processes)
    model = getattr(model, "module", model)
    if model.mim:
        model.patch_memory.check_batch(config.batch_size * num_processes)


class SOPStats(MaSSLStats):
    """MaSSL's statistics for SOP (``learn.sop_stats``): the loss and its [CLS] and MIM terms,
    agreement and the memory slots hit by each view's nearest support, perplexity, tau_t; the
    non-finite stop and collapse warning."""

    name = "sop_stats"
    METHOD = "SOP"
    TERMS = ("loss", "cls_loss", "mim_loss", "koleo")

    def batch_terms(self) -> Tensor | None:
        parts = self.learn.loss_func.parts
        return None if parts is None else parts.float()


def callbacks(config: SOPConfig) -> list:
    """MaSSL's lr and weight-decay schedules, the tau_t schedule, the teacher's EMA, SOP's
    statistics and, with ``clip_grad``, the per-parameter clipping."""
    cbs = [
        MaSSLSchedules(config),
        TeacherTemperatureWarmup(config.warmup_teacher_temperature, config.teacher_temperature, config.teacher_temperature_epochs),
        TeacherEMA(config.teacher_momentum),
        SOPStats(every=config.log_every),
    ]
    return cbs + ([ClipGradPerParameter(config.clip_grad)] if config.clip_grad > 0 else [])


SOP = Method(
    name="sop", config=SOPConfig, build_model=build_model,
    loss=lambda config: SOPLoss(config.student_temperature, config.warmup_teacher_temperature, config.koleo_weight),
    optimizer=opt_func,
    callbacks=callbacks, splitter=decay_groups, check=check_memories,
)


def sop_learner(dls, config: SOPConfig, **kwargs):
    """:func:`carp_fast.learner.method_learner` for SOP: a Learner that trains SOP on ``dls``.

    ``model=`` trains another :class:`SOPStudentTeacher`. Callbacks besides the shared ones:
    MaSSLSchedules, TeacherTemperatureWarmup, ClipGradPerParameter, TeacherEMA and SOPStats
    (``learn.sop_stats.history``).

    Raises:
        ValueError: the memory size is not a multiple of ``batch_size x processes``.
    """
    return method_learner(SOP, dls, config, **kwargs)
