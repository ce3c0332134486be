"""The networks every method shares: a branch (backbone -> head), the student/teacher pair,
CARP's projection head and prototypes.

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
    """Three Linear layers with GELU between them: ``[M, in] -> [M, out]``.

    CARP's (``batch_norm=True``): BatchNorm before each GELU, the output as it is. MaSSL's
    (``batch_norm=False, unit_output=True``, official ``head.py``): no BatchNorm, the output
    scaled to unit length. The Linear layers start from trunc-normal weights (std 0.02) and
    zero biases, as both official heads (after DINO), not PyTorch's fan-in uniform default.
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256, *, batch_norm: bool = True,
                 unit_output: bool = False):
        super().__init__()
        norm = (lambda: [nn.BatchNorm1d(hidden_dim)]) if batch_norm else (lambda: [])
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), *norm(), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), *norm(), nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        self.unit_output = unit_output
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        z = self.mlp(x)
        return F.normalize(z, dim=-1, eps=1e-6) if self.unit_output else z


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


class Branch(nn.Module):
    """backbone -> head for one branch (student or teacher); a method may add its own end."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

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


class StudentTeacher(nn.Module):
    """A student, its EMA teacher and the partition sampler in one module (one state dict).

    The shared part of every method: the teacher starts as the student and never receives
    gradients (:class:`carp_fast.callbacks.TeacherEMA` updates it), its BatchNorm mode is
    decided here, and :meth:`forward` embeds the crops, draws a partition and returns the
    block logits of both. A method subclasses it and defines :meth:`block_logits` (against
    its prototypes or memory) and, where it keeps state, :meth:`after_logits`.

    Args:
        student: a :class:`Branch` (or anything with ``embed(crops) -> [V*N, D]``).
        teacher: the teacher's branch, built apart when it differs (MaSSL: no drop-path); it
            is loaded with the student's weights. None: a deep copy of the student.
        n_slots: K, the slots the partition divides (prototypes, memory entries).
        block_size: B, slots per partition block.
        partition: ``"random"`` (a new partition every step, the paper's default) or
            ``"fixed"`` (sequential blocks drawn once, the paper's "constant" ablation).
        global_crops: how many leading crops are global; the teacher sees only those.
        seed: seed of the partition sampler.
        teacher_batch_stats: run the teacher's BatchNorm on batch statistics during
            training (as DINO and BYOL do); False keeps it in eval mode.
        ema_teacher: False: no teacher network at all (CARL, and the paper's B.2 row "w/o
            mom. enc.", eta = 0 in the EMA update). The targets are then the student's own
            block logits of the global crops, detached (one forward pass less per step);
            ``self.teacher`` is the student itself, which is what an EMA with eta = 0 would
            hold, so whatever evaluates or exports "the teacher" gets the student, and the
            state dict holds no ``teacher.*`` key.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module | None = None, *, n_slots: int, block_size: int,
                 partition: str = "random", global_crops: int = 2, seed: int = 0, teacher_batch_stats: bool = True,
                 ema_teacher: bool = True):
        super().__init__()
        if global_crops < 1:
            raise ValueError(f"global_crops must be >= 1, got {global_crops}")
        if teacher is not None and not ema_teacher:
            raise ValueError("a teacher network was given with ema_teacher=False; give none (the student is its own target)")
        self.global_crops, self.teacher_batch_stats, self.ema_teacher = global_crops, teacher_batch_stats, ema_teacher
        self.student = student
        if ema_teacher:
            if teacher is None:
                teacher = copy.deepcopy(student)
            else:
                teacher.load_state_dict(student.state_dict())  # the same start
            self.teacher = teacher
            for p in self.teacher.parameters():
                p.requires_grad_(False)
        self.partitioner = PartitionSampler(n_slots, block_size, mode=partition, seed=seed)

    @property
    def teacher(self) -> nn.Module:
        """The EMA teacher's branch; without one (``ema_teacher=False``), the student."""
        # A property so that it follows the registered modules (SyncBatchNorm conversion
        # replaces children); nn.Module.__setattr__ still registers ``self.teacher = ...``.
        return self._modules["teacher"] if "teacher" in self._modules else self._modules["student"]

    def train(self, mode: bool = True) -> "StudentTeacher":
        # fastai's TrainEvalCallback calls model.train() on the whole model every epoch:
        # the teacher's mode is decided here, not by whoever calls train().
        super().train(mode)
        if self.ema_teacher:
            self.teacher.train(mode and self.teacher_batch_stats)
        return self

    def block_logits(self, branch: nn.Module, z: Tensor, partition: Tensor) -> Tensor:
        """The method's logits of embeddings ``z`` ``[M, D]`` of ``branch`` (``self.student`` or
        ``self.teacher``) over the partition ``[P, B]``: ``[M, P, B]``, float32."""
        raise NotImplementedError

    def after_logits(self, teacher_embeddings: Tensor, n_images: int) -> None:
        """Called in training after the step's logits, with the teacher's ``[V_t*N, D]``
        embeddings (no gradient); a method with a memory writes it here."""

    def forward(self, *crops: Tensor) -> BlockLogits:
        """One step's block logits.

        Args:
            crops: V_s tensors ``[N, 3, H, W]``: ``global_crops`` global crops first, then
                local crops. The teacher sees the global ones.

        Returns:
            :class:`~carp_fast.loss.BlockLogits` with student ``[V_s, N, P, B]`` and teacher
            ``[V_t, N, P, B]`` block logits of one fresh partition ``[P, B]``. Without an
            EMA teacher, the "teacher" logits are the student's of the global crops, detached.
        """
        if len(crops) < self.global_crops:
            raise ValueError(f"expected at least {self.global_crops} crops (the global ones), got {len(crops)}")
        n_images = crops[0].shape[0]
        n_targets = self.global_crops * n_images
        z = self.student.embed(crops)  # [V_s*N, D]
        if self.ema_teacher:
            with torch.no_grad():
                w = self.teacher.embed(crops[: self.global_crops])  # [V_t*N, D]
        else:
            w = z[:n_targets].detach()  # the student's global crops are the targets: no second forward
        partition = self.partitioner(device=z.device)  # [P, B]
        s = self.block_logits(self.student, z, partition)  # [V_s*N, P, B]
        with torch.no_grad():
            t = self.block_logits(self.teacher, w, partition) if self.ema_teacher else s[:n_targets].detach()  # [V_t*N, P, B]
            if self.training:
                self.after_logits(w, n_images)
        return BlockLogits(
            s.view(len(crops), n_images, *partition.shape),  # [V_s, N, P, B]
            t.view(self.global_crops, n_images, *partition.shape),  # [V_t, N, P, B]
            partition,
        )
