"""Which images a rank reads, in which order, each epoch. Shared by both backends.

Pretraining: one permutation of all N images per epoch, a pure function of
(seed, epoch) and identical on every rank; the first `steps * batch_size * num_shards`
images of it are cut into `num_shards` contiguous slices, one per rank (shard = global
rank). So within an epoch every image is read at most once across ranks, only the
drop-last remainder (< batch_size * num_shards images, a different one every epoch) is
left out, and every rank runs exactly `steps` steps (equal-length epochs: no rank
waits in a collective for another). Resuming at epoch e reproduces epoch e's order.

Evaluation: a fixed order, rank r reads images r, r + num_shards, ... (every image
exactly once over the ranks, no drop-last; ranks may differ by one image).
"""

from __future__ import annotations

import numpy as np


def check_shard(shard_id: int, num_shards: int) -> None:
    """Validate a (shard_id, num_shards) pair, as read from Accelerate by the caller."""
    if num_shards < 1:
        raise ValueError(f"num_shards must be >= 1 (the world size), got {num_shards}")
    if not 0 <= shard_id < num_shards:
        raise ValueError(f"shard_id must be in [0, num_shards={num_shards}) (the global rank), got {shard_id}")


def pretrain_steps(n: int, batch_size: int, num_shards: int) -> int:
    """Steps per epoch on every rank: floor(N / (batch_size * num_shards))."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    steps = n // (batch_size * num_shards)
    if steps == 0:
        raise ValueError(
            f"the data set has {n} images, fewer than one global batch (batch_size={batch_size} x "
            f"num_shards={num_shards}); lower batch_size"
        )
    return steps


def pretrain_order(n: int, *, batch_size: int, seed: int, epoch: int, shard_id: int, num_shards: int) -> np.ndarray:
    """Indices this rank reads in `epoch`, `[steps * batch_size]` int64, in reading order."""
    check_shard(shard_id, num_shards)
    if epoch < 0:
        raise ValueError(f"epoch must be >= 0, got {epoch}")
    per_rank = pretrain_steps(n, batch_size, num_shards) * batch_size
    perm = np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)
    return perm[shard_id * per_rank: (shard_id + 1) * per_rank].astype(np.int64)


def eval_order(n: int, *, shard_id: int, num_shards: int) -> np.ndarray:
    """Indices this rank evaluates, fixed order, `[ceil((N - shard_id) / num_shards)]`."""
    check_shard(shard_id, num_shards)
    return np.arange(shard_id, n, num_shards, dtype=np.int64)


def augment_seed(seed: int, shard_id: int, epoch: int) -> int:
    """Seed of the random augmentations of one rank in one epoch (31 bits, for DALI).

    Distinct per rank (ranks must not draw the same crops for their different images
    in lock-step) and per epoch, so a resumed epoch replays its augmentations too.
    """
    return int(np.random.SeedSequence([seed, shard_id, epoch, 0xA06]).generate_state(1)[0] & 0x7FFFFFFF)


def batches(order: np.ndarray, batch_size: int) -> list[np.ndarray]:
    """Split an order into consecutive batches (the last one may be short)."""
    return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]
