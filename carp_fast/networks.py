"""Student and teacher networks: backbone -> projection head -> prototypes.

Paper appendix C.1: a ResNet-50 backbone (2048-d), a 3-layer MLP head with BatchNorm and
GELU (hidden 2048, output 256) and a linear assigner over K = 65,536 prototypes whose
rows are unit vectors (weight normalisation with the norm fixed to 1; the embedding
itself is not normalised). The teacher is an exponential moving average of the student
and never receives gradients (:class:`carp_fast.callbacks.TeacherEMA` updates it).

Dimension letters: V views, N images, D embedding width, K prototypes, P blocks,
B prototypes per block.
"""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .backbones import build_backbone
from .loss import BlockLogits
from .partition import PartitionSampler


def batches_by_resolution(crops: Sequence[Tensor]) -> list[Tensor]:
    """Consecutive crops of one size concatenated, so a backbone runs once per resolution.

    Args:
        crops: V tensors ``[N, 3, H_v, W_v]`` (global crops first, then local crops).

    Returns:
        one tensor ``[V_r*N, 3, H_r, W_r]`` per run of equal-size crops, in order.
    """
    batches, start = [], 0
    while start < len(crops):
        end = start
        while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
            end += 1
        batches.append(torch.cat(crops[start:end]))
        start = end
    return batches


class ProjectionHead(nn.Module):
    """Three Linear layers with BatchNorm + GELU between them: ``[M, in] -> [M, out]``.

    The Linear layers start from trunc-normal weights (std 0.02) and zero biases.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim),
            nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        # As the official head (modules/carp_head.py, after DINO): trunc-normal weights with
        # std 0.02 and zero biases, not PyTorch's fan-in uniform default.
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.mlp(x)


class Prototypes(nn.Module):
    """K prototypes, each a unit vector: ``logits = z @ normalize(weight).T``.

    Equivalent to ``weight_norm(nn.Linear(D, K, bias=False))`` with ``weight_g`` fixed to
    1; ``weight`` ``[K, D]`` stores the directions. Logits are float32 (float64 for float64
    inputs) whatever the autocast: bf16 logits put the head's gradients 0.9-4 % off a
    float32 forward (issue 19). The cost, ``[M, D] @ [D, K]`` with D = 256: BENCHMARKS.md,
    "Issue 19" (1.41x the bf16 logit path on a CPU).
    """

    def __init__(self, dim: int, n_prototypes: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(n_prototypes, dim))
        nn.init.normal_(self.weight, std=dim**-0.5)

    @property
    def n_prototypes(self) -> int:
        return self.weight.shape[0]

    def forward(self, z: Tensor) -> Tensor:
        """All logits: ``[M, D] -> [M, K]``, float32 at least."""
        return full_precision_matmul(z, F.normalize(self.weight, dim=1).t())

    def block_logits(self, z: Tensor, partition: Tensor) -> Tensor:
        """Logits arranged by partition block: ``[M, D], [P, B] -> [M, P, B]``.

        Multiplies by the permuted prototype matrix instead of gathering ``[M, K]``
        logits: one matmul, and no gather of the largest tensor of the step.
        """
        n_blocks, block_size = partition.shape
        rows = F.normalize(self.weight.index_select(0, partition.flatten()), dim=1)  # [P*B, D], float32
        return full_precision_matmul(z, rows.t()).view(-1, n_blocks, block_size)


def full_precision_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b`` in float32 at least (float64 stays), with autocast off: ``[M, D], [D, K] -> [M, K]``.

    The logits of every method (CARP's prototypes, MaSSL's memory) go through it.
    """
    dtype = torch.promote_types(torch.promote_types(a.dtype, b.dtype), torch.float32)
    with torch.autocast(a.device.type, enabled=False):
        return a.to(dtype) @ b.to(dtype)


class CARPNetwork(nn.Module):
    """backbone -> head -> prototypes for one branch (student or teacher)."""

    def __init__(self, arch: str = "resnet50", n_prototypes: int = 65536, hidden_dim: int = 2048, embed_dim: int = 256):
        super().__init__()
        self.backbone = build_backbone(arch)
        self.head = ProjectionHead(self.backbone.feature_dim, hidden_dim, embed_dim)
        self.prototypes = Prototypes(embed_dim, n_prototypes)

    def embed(self, crops: Sequence[Tensor]) -> Tensor:
        """Embeddings of all crops, one backbone pass per resolution.

        Args:
            crops: V tensors ``[N, 3, H_v, W_v]``; consecutive crops of equal size are
                batched together (global crops first, then local crops).

        Returns:
            ``[V*N, D]``, view-major: rows ``v*N .. (v+1)*N-1`` belong to crop v.
        """
        features = [self.backbone(x) for x in batches_by_resolution(crops)]  # [V_r*N, F] each
        return self.head(torch.cat(features))


CARPOutput = BlockLogits  # what StudentTeacher returns; the one output type of every method


class StudentTeacher(nn.Module):
    """Student and EMA teacher in one module, so one state dict (``learn.save``) holds both.

    Args:
        arch: backbone architecture (see :func:`carp_fast.backbones.build_backbone`).
        n_prototypes: K.
        block_size: B, prototypes per partition block (``B = K`` is the CARL setting).
        partition: ``"random"`` (a new partition every step, the paper's default) or
            ``"fixed"`` (sequential blocks drawn once, the paper's "constant" ablation).
        global_crops: how many leading crops are global; the teacher sees only those.
        hidden_dim, embed_dim: projection head widths.
        seed: seed of the partition sampler.
        teacher_batch_stats: run the teacher's BatchNorm on batch statistics during
            training (as DINO and BYOL do); False keeps it in eval mode.
    """

    def __init__(
        self,
        arch: str = "resnet50",
        n_prototypes: int = 65536,
        block_size: int = 512,
        partition: str = "random",
        global_crops: int = 2,
        hidden_dim: int = 2048,
        embed_dim: int = 256,
        seed: int = 0,
        teacher_batch_stats: bool = True,
    ):
        super().__init__()
        if global_crops < 1:
            raise ValueError(f"global_crops must be >= 1, got {global_crops}")
        self.global_crops = global_crops
        self.teacher_batch_stats = teacher_batch_stats
        self.student = CARPNetwork(arch, n_prototypes, hidden_dim, embed_dim)
        self.teacher = copy.deepcopy(self.student)
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        self.partitioner = PartitionSampler(n_prototypes, block_size, mode=partition, seed=seed)

    def train(self, mode: bool = True) -> "StudentTeacher":
        # fastai's TrainEvalCallback calls model.train() on the whole model every epoch:
        # the teacher's mode is decided here, not by whoever calls train().
        super().train(mode)
        self.teacher.train(mode and self.teacher_batch_stats)
        return self

    def forward(self, *crops: Tensor) -> CARPOutput:
        """One CARP step's logits.

        Args:
            crops: V_s tensors ``[N, 3, H, W]``: ``global_crops`` global crops first, then
                local crops. The teacher sees the global ones.

        Returns:
            :class:`CARPOutput` with student ``[V_s, N, P, B]`` and teacher
            ``[V_t, N, P, B]`` block logits of one fresh partition.
        """
        if len(crops) < self.global_crops:
            raise ValueError(f"expected at least {self.global_crops} crops (the global ones), got {len(crops)}")
        n_images = crops[0].shape[0]
        z = self.student.embed(crops)  # [V_s*N, D]
        with torch.no_grad():
            w = self.teacher.embed(crops[: self.global_crops])  # [V_t*N, D]
        partition = self.partitioner(device=z.device)  # [P, B]
        s = self.student.prototypes.block_logits(z, partition)  # [V_s*N, P, B]
        with torch.no_grad():
            t = self.teacher.prototypes.block_logits(w, partition)  # [V_t*N, P, B]
        return CARPOutput(
            s.view(len(crops), n_images, *partition.shape),  # [V_s, N, P, B]
            t.view(self.global_crops, n_images, *partition.shape),  # [V_t, N, P, B]
            partition,
        )
