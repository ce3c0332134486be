"""The memory of MaSSL: a FIFO of past teacher embeddings, partitioned like CARP's prototypes.

Paper: Silva & Ramirez Rivera, "Learning from Memory: A Non-Parametric Memory Augmented
Self-Supervised Learning of Visual Features", ICML 2024, section 3 (official code:
``memory_bank.py`` of github sthalles/MaSSL). Where CARP partitions K learned prototypes,
MaSSL partitions K memory slots that hold unit-length teacher embeddings of past batches.

Dimension letters: K memory slots, D embedding width, M rows (views x images), P blocks,
B slots per block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..distributed import world_size
from ..networks import full_precision_matmul


class Memory(nn.Module):
    """K unit-length embeddings ``[K, D]`` written first in, first out.

    ``embeddings`` and ``pointer`` are buffers: they travel in the state dict, so a
    checkpoint resumes the memory exactly. Every rank holds the same memory: each write
    all-gathers the rows of all ranks (rank order) and writes them at the same pointer.

    Args:
        size: K, the number of slots (official default 65,536; 131,072 in the published runs).
        dim: D, the embedding width (the head's output).
        seed: seed of the initial random unit vectors (the same on every rank).
    """

    def __init__(self, size: int = 65536, dim: int = 256, seed: int = 0):
        super().__init__()
        if size < 1 or dim < 1:
            raise ValueError(f"memory size and dim must be >= 1, got size={size}, dim={dim}")
        initial = torch.randn(size, dim, generator=torch.Generator().manual_seed(seed))
        self.register_buffer("embeddings", F.normalize(initial, dim=1))  # [K, D]
        self.register_buffer("pointer", torch.zeros((), dtype=torch.long))  # next slot to write

    @property
    def size(self) -> int:
        return self.embeddings.shape[0]

    def check_batch(self, rows_per_write: int) -> None:
        """Raise unless ``rows_per_write`` (images per rank x ranks) divides K.

        The official code asserts the same: a write never straddles the end of the memory,
        so every slot is overwritten once per K / rows writes.
        """
        if rows_per_write < 1 or self.size % rows_per_write:
            raise ValueError(
                f"the memory size K={self.size} must be a multiple of the images written per step "
                f"(batch size x processes = {rows_per_write}); change memory_size or batch_size"
            )

    def block_logits(self, z: Tensor, partition: Tensor) -> Tensor:
        """Cosine similarities to the memory, arranged by partition block, in float32.

        Multiplies by the permuted memory (``z @ M[partition].T``) instead of gathering
        ``[M, K]`` logits; autocast is switched off so bf16/fp16 runs keep fp32 logits (a bf16
        cosine is off by up to 4e-3, 0.1 after the division by tau_t = 0.04). No gradient
        reaches the memory.

        Args:
            z: ``[M, D]`` embeddings (L2-normalised by the head).
            partition: ``[P, B]`` slot indices, e.g. from CARP's ``PartitionSampler``.

        Returns:
            ``[M, P, B]``, float32 (float64 for float64 inputs).
        """
        n_blocks, block_size = partition.shape
        rows = self.embeddings.index_select(0, partition.flatten())  # [P*B, D], a copy: later writes do not touch it
        return full_precision_matmul(z, rows.t()).view(-1, n_blocks, block_size)  # [M, P, B]

    @torch.no_grad()
    def write(self, embeddings: Tensor) -> None:
        """All-gather ``embeddings`` ``[N, D]`` over ranks and write them at the pointer.

        One ``all_gather`` on several processes (a no-op on one); no host synchronisation:
        the pointer stays on the device and the slots are indexed modulo K.
        """
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"memory writes take [N, D={self.embeddings.shape[1]}] embeddings, got {tuple(embeddings.shape)}")
        rows = embeddings.detach().to(self.embeddings).contiguous()  # fp32, the memory's device
        world = world_size()
        if world > 1:
            parts = [torch.empty_like(rows) for _ in range(world)]
            dist.all_gather(parts, rows)
            rows = torch.cat(parts)  # [W*N, D], rank-major: the order of one process's batch
        self.check_batch(rows.shape[0])
        slots = (self.pointer + torch.arange(rows.shape[0], device=self.pointer.device)) % self.size  # [W*N]
        self.embeddings.index_copy_(0, slots, rows)
        self.pointer.copy_((self.pointer + rows.shape[0]) % self.size)

    def extra_repr(self) -> str:
        return f"size={self.size}, dim={self.embeddings.shape[1]}"
