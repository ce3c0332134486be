"""MaSSL's student, EMA teacher and memory: backbone -> head (unit vector), no prototypes.

Paper: Silva & Ramirez Rivera, ICML 2024 (official code: ``head.py``, ``memory_bank.py``,
``main_massl.py`` of github sthalles/MaSSL). ViT-S/16 and ViT-B/16 come from timm with
``dynamic_img_size=True``: the position embeddings are interpolated, so 224 px global and
96 px local crops go through the same weights; the feature is the class token. ResNets of
:func:`carp_fast.backbones.build_backbone` work as well.

Dimension letters: V views, N images, F backbone features, D embedding, K memory slots,
P blocks, B slots per block.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..backbones import ARCHITECTURES as RESNETS
from ..backbones import build_backbone as build_resnet
from ..networks import batches_by_resolution
from ..partition import PartitionSampler
from .loss import MaSSLOutput
from .memory import Memory

# Our name -> timm's model name (patch 16, 224 px position grid, as the official vit_small/vit_base).
VITS = {"vit_small": "vit_small_patch16_224", "vit_base": "vit_base_patch16_224"}
ARCHITECTURES = tuple(VITS) + RESNETS


def build_backbone(arch: str, drop_path: float = 0.0) -> nn.Module:
    """A backbone mapping ``[N, 3, H, W]`` (any H, W a multiple of the patch) to ``[N, F]``.

    Args:
        arch: ``vit_small`` (ViT-S/16, 384-d) | ``vit_base`` (ViT-B/16, 768-d) | a ResNet of
            :data:`carp_fast.backbones.ARCHITECTURES`.
        drop_path: stochastic depth of the ViT (student 0.1, teacher 0); ResNets have none.

    Returns:
        the module, with its width as ``module.feature_dim``. No pretrained weights.
    """
    if arch in VITS:
        import timm

        # num_classes=0: no classifier; global_pool="token": the class token is the feature.
        net = timm.create_model(
            VITS[arch], pretrained=False, num_classes=0, global_pool="token", dynamic_img_size=True, drop_path_rate=drop_path
        )
        nn.init.trunc_normal_(net.cls_token, std=0.02)  # the official init (timm's: normal, std 1e-6)
        net.feature_dim = net.num_features
        return net
    if arch in RESNETS:
        return build_resnet(arch)
    raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")


class MaSSLHead(nn.Module):
    """Three Linear layers with GELU between them, no BatchNorm; a unit-length output.

    ``[M, in] -> [M, out]``; weights trunc-normal (std 0.02), biases zero (official ``head.py``).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 2048, out_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, out_dim),
        )
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor) -> Tensor:
        return F.normalize(self.mlp(x), dim=-1, eps=1e-6)


class MaSSLNetwork(nn.Module):
    """backbone -> head for one branch (student or teacher)."""

    def __init__(self, backbone: nn.Module, hidden_dim: int = 2048, embed_dim: int = 256):
        super().__init__()
        self.backbone = backbone
        self.head = MaSSLHead(backbone.feature_dim, hidden_dim, embed_dim)

    def embed(self, crops: Sequence[Tensor]) -> Tensor:
        """Unit-length embeddings ``[V*N, D]`` (view-major) of V crops ``[N, 3, H_v, W_v]``,
        one backbone pass per resolution."""
        features = [self.backbone(x) for x in batches_by_resolution(crops)]  # [V_r*N, F] each
        return self.head(torch.cat(features))


class MaSSLStudentTeacher(nn.Module):
    """Student, EMA teacher, memory and partition sampler in one module (one state dict).

    Each training forward computes the block similarities of all views to the memory and
    *then* writes the teacher embeddings of the second global view (all ranks gathered)
    at the memory's pointer, as the official code does. Evaluation forwards leave the
    memory alone.

    Args:
        backbone: a function ``drop_path -> backbone`` (see :func:`build_backbone`); called
            once for the student and once, with 0, for the teacher.
        memory_size: K.
        block_size: B, memory slots per partition block (official: 1,024; 16,384 of 131,072
            in the published runs).
        partition: ``"random"`` (a fresh partition every step) or ``"fixed"``.
        global_crops: leading crops that the teacher sees (>= 2: the second is written).
        hidden_dim, embed_dim: head widths.
        drop_path: the student's stochastic depth (the teacher's is 0).
        seed: seed of the partition sampler and of the initial memory.
        teacher_batch_stats: BatchNorm backbones only: teacher on batch statistics in training.
    """

    def __init__(
        self,
        backbone: Callable[[float], nn.Module],
        memory_size: int = 65536,
        block_size: int = 1024,
        partition: str = "random",
        global_crops: int = 2,
        hidden_dim: int = 2048,
        embed_dim: int = 256,
        drop_path: float = 0.1,
        seed: int = 0,
        teacher_batch_stats: bool = True,
    ):
        super().__init__()
        if global_crops < 2:
            raise ValueError(f"MaSSL writes the second global crop to the memory: global_crops must be >= 2, got {global_crops}")
        self.global_crops, self.teacher_batch_stats = global_crops, teacher_batch_stats
        self.student = MaSSLNetwork(backbone(drop_path), hidden_dim, embed_dim)
        self.teacher = MaSSLNetwork(backbone(0.0), hidden_dim, embed_dim)
        self.teacher.load_state_dict(self.student.state_dict())  # same start; only drop-path differs
        for p in self.teacher.parameters():
            p.requires_grad_(False)
        # Every rank writes the same all-gathered rows, so the memory needs no DDP buffer
        # broadcast (carp_fast.learner.build_learner wraps with broadcast_buffers=False).
        self.memory = Memory(memory_size, embed_dim, seed=seed)
        self.partitioner = PartitionSampler(memory_size, block_size, mode=partition, seed=seed)

    def train(self, mode: bool = True) -> "MaSSLStudentTeacher":
        # fastai calls model.train() on the whole model every epoch (DESIGN.md section 3).
        super().train(mode)
        self.teacher.train(mode and self.teacher_batch_stats)
        return self

    def forward(self, *crops: Tensor) -> MaSSLOutput:
        """One step's block similarities, then (training only) the memory write.

        Args:
            crops: V_s tensors ``[N, 3, H, W]``, the ``global_crops`` global ones first.

        Returns:
            :class:`MaSSLOutput`: student ``[V_s, N, P, B]``, teacher ``[V_t, N, P, B]``
            (float32, no temperature), and the partition ``[P, B]``.
        """
        if len(crops) < self.global_crops:
            raise ValueError(f"expected at least {self.global_crops} crops (the global ones), got {len(crops)}")
        n_images = crops[0].shape[0]
        z = self.student.embed(crops)  # [V_s*N, D]
        with torch.no_grad():
            w = self.teacher.embed(crops[: self.global_crops])  # [V_t*N, D]
        partition = self.partitioner(device=z.device)  # [P, B]
        s = self.memory.block_logits(z, partition)  # [V_s*N, P, B]
        with torch.no_grad():
            t = self.memory.block_logits(w, partition)  # [V_t*N, P, B]
        if self.training:
            self.memory.write(w[n_images : 2 * n_images])  # the second global view, after the logits
        return MaSSLOutput(
            s.view(len(crops), n_images, *partition.shape),  # [V_s, N, P, B]
            t.view(self.global_crops, n_images, *partition.shape),  # [V_t, N, P, B]
            partition,
        )
