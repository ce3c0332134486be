"""Where each step's partition of the prototypes comes from.

A module, so the random state travels in the model's state dict: a resumed run draws the
same partitions as an uninterrupted one.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .loss import random_partition

PARTITION_MODES = ("random", "fixed")


class SeededSampler(nn.Module):
    """A module that draws with its own seeded generator, kept on the device it draws on and
    carried in the state dict (``get_extra_state``), so that a resumed run draws what an
    uninterrupted one would. Subclasses call :meth:`generator` in ``forward``."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self._generator: torch.Generator | None = None
        self._pending_state: Tensor | None = None  # loaded before the device is known

    def generator(self, device: torch.device) -> torch.Generator:
        """The generator on ``device``: drawing on the CPU and copying would block the host on every step."""
        if self._generator is None or self._generator.device.type != device.type:
            self._generator = torch.Generator(device=device)
            self._generator.manual_seed(self.seed)
            if self._pending_state is not None:
                self._generator.set_state(self._pending_state)
                self._pending_state = None
        return self._generator

    def get_extra_state(self) -> Any:
        state = self._generator.get_state() if self._generator is not None else self._pending_state
        return {"generator_state": state}

    def set_extra_state(self, state: Any) -> None:
        self._generator, self._pending_state = None, state.get("generator_state")


class PartitionSampler(SeededSampler):
    """Draws the ``[P, B]`` partition of K prototypes for every step.

    Args:
        n_prototypes: K.
        block_size: B; ``B = K`` gives one block (with an EMA teacher: table B.2's "w/ mom. enc." cell at
            N_B = K; CARL is one block with no teacher, :mod:`carp_fast.carl`).
        mode: ``"random"`` draws a fresh uniformly random partition per call (paper
            section 4); ``"fixed"`` returns sequential blocks ``arange(K).view(P, B)`` every
            time (the paper's "constant" ablation, section 6.2).
        seed: seed of the sampler's own generator (identical on every rank; the partition
            is also broadcast from rank 0 in a distributed run).
    """

    def __init__(self, n_prototypes: int, block_size: int, mode: str = "random", seed: int = 0):
        super().__init__(seed)
        if mode not in PARTITION_MODES:
            raise ValueError(f"partition mode must be one of {PARTITION_MODES}, got {mode!r}")
        if not 1 <= block_size <= n_prototypes:
            raise ValueError(f"block_size must be in [1, n_prototypes={n_prototypes}], got {block_size}")
        self.n_prototypes, self.block_size, self.mode = n_prototypes, block_size, mode
        n_blocks = n_prototypes // block_size
        self.register_buffer("fixed", torch.arange(n_blocks * block_size).view(n_blocks, block_size), persistent=False)

    def forward(self, device: torch.device | str | None = None) -> Tensor:
        """The next partition, LongTensor ``[P, B]`` on ``device``."""
        device = torch.device(device) if device is not None else self.fixed.device
        if self.mode == "fixed":
            return self.fixed.to(device)
        return random_partition(self.n_prototypes, self.block_size, generator=self.generator(device), device=device)

    def extra_repr(self) -> str:
        return f"n_prototypes={self.n_prototypes}, block_size={self.block_size}, mode={self.mode!r}, seed={self.seed}"
