"""The loader contract both backends share: epochs, exact `len`, device, `one_batch`.

A loader yields one tuple per step:
- pretraining: `(g_0, ..., g_{n-1}, l_0, ..., l_{m-1}, labels)`, each crop float32
  `[N, 3, S, S]` normalised with mean/std, labels int64 `[N]` (-1 when unlabelled);
- evaluation: `(images [N, 3, S, S] float32, labels [N] int64)`.

Epochs: iterating runs epoch `self.epoch` and then advances it; `set_epoch(e)` makes the
next iteration run epoch e, whose order (and augmentation seeds) are a pure function of
(seed, e, shard): a resumed run replays its epochs exactly. `set_epoch(e, start_batch=b)`
makes it start at batch b of epoch e with exactly the batches an uninterrupted epoch has there
(a mid-epoch resume): a backend whose augmentations are seeded per image skips the first b
batches' images (`skips_exactly`); another one produces and drops them. Each epoch runs on a fresh
backend iterator (a DALI pipeline or torch DataLoader built for that epoch's order), so
an abandoned iteration (a `break`, `one_batch()`) never leaves a later epoch mid-way
or skips one.

Subclasses implement `_produce(order, epoch)`: yield the batches of `order`, in order.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from carp_fast.pipelines.sharding import check_shard, eval_order, pretrain_order, pretrain_steps


def resolve_device(device) -> torch.device:
    """None -> the current CUDA device if there is one, else the CPU."""
    if device is None:
        return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


class EpochLoader:
    """Base class: sharded epoch orders, exact `len`, device moves, fastai-facing attributes."""

    backend = "base"
    skips_exactly = False  # True: per-image seeds, so starting the order at batch b changes no batch

    def __init__(self, source, *, batch_size: int, train: bool, shard_id: int, num_shards: int, seed: int,
                 device, mean, std) -> None:
        check_shard(shard_id, num_shards)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source, self.bs, self.train = source, batch_size, train
        self.shard_id, self.num_shards, self.seed = shard_id, num_shards, seed
        self.device = resolve_device(device)
        self.mean, self.std = tuple(mean), tuple(std)
        self.epoch, self.start_batch = 0, 0
        n = len(source)
        self._len = pretrain_steps(n, batch_size, num_shards) if train else -(-len(self._order(0)) // batch_size)

    # ---- epochs -------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Exact number of batches per epoch on this rank."""
        return self._len

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Make the next iteration run `epoch` from its batch `start_batch` (for resuming;
        iterating also advances the epoch, and starts the next one at its first batch)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if not 0 <= start_batch <= len(self):
            raise ValueError(f"start_batch must be in [0, {len(self)}] (the batches of an epoch), got {start_batch}")
        self.epoch, self.start_batch = int(epoch), int(start_batch)

    def _order(self, epoch: int) -> np.ndarray:
        n = len(self.source)
        if self.train:
            return pretrain_order(n, batch_size=self.bs, seed=self.seed, epoch=epoch,
                                  shard_id=self.shard_id, num_shards=self.num_shards)
        return eval_order(n, shard_id=self.shard_id, num_shards=self.num_shards)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        epoch, start = self.epoch, self.start_batch
        self.epoch, self.start_batch = epoch + 1, 0  # advanced up front: an abandoned epoch still counts as run
        return self._iterate(self._order(epoch), epoch, start)

    def _iterate(self, order: np.ndarray, epoch: int, start: int = 0) -> Iterator[tuple[torch.Tensor, ...]]:
        """The batches of `order` from batch `start` on, on the loader's device."""
        expected = -(-len(order) // self.bs)
        if self.skips_exactly:
            order, drop = order[start * self.bs:], 0
        else:
            drop = start  # sequential augmentation seeds: produce the first batches too, and drop them
        steps = start - drop
        for batch in self._produce(order, epoch):
            steps += 1
            if steps > start:
                yield self._to_device(batch)
        if steps != expected:  # a backend that ends early must not pass silently
            raise RuntimeError(f"{self.backend} loader produced {steps} batches, expected {expected}")

    def _produce(self, order: np.ndarray, epoch: int) -> Iterator[tuple[torch.Tensor, ...]]:
        raise NotImplementedError

    # ---- device -------------------------------------------------------------------------------
    def to(self, device) -> "EpochLoader":
        """Deliver batches on `device` (fastai's `DataLoaders.device` setter calls this)."""
        self.device = resolve_device(device)
        return self

    def _to_device(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        if self.device.type != "cuda":
            return tuple(t if t.device == self.device else t.to(self.device) for t in batch)
        # Pinned host memory makes the copies asynchronous: no host sync per batch.
        return tuple(t if t.device == self.device else t.pin_memory().to(self.device, non_blocking=True) for t in batch)

    # ---- fastai-facing ------------------------------------------------------------------------
    @property
    def dataset(self):
        """The source (fastai reads `dls.train_ds`)."""
        return self.source

    def one_batch(self) -> tuple[torch.Tensor, ...]:
        """The first batch of the next epoch, from a separate iterator.

        Does not touch the epoch counter or any running iteration.
        """
        order = self._order(self.epoch)[: self.bs]
        it = self._iterate(order, self.epoch)
        try:
            return next(it)
        finally:
            it.close()

    def show_batch(self, max_n: int = 4, **kwargs):
        """Draw the crops of up to `max_n` images of `one_batch()`; returns the figure."""
        from carp_fast.pipelines.show import show_crops

        return show_crops(self.one_batch(), self.mean, self.std, max_n=max_n, **kwargs)

    def __repr__(self) -> str:
        kind = "pretrain" if self.train else "eval"
        return (f"{type(self).__name__}({kind}, {self.source!r}, batch_size={self.bs}, len={len(self)}, "
                f"shard {self.shard_id}/{self.num_shards}, device={self.device})")
