"""Distributed sharding: exact coverage per epoch, no overlap, new shuffle per epoch, exact len."""

import numpy as np
import pytest
import torch

from carp_fast.pipelines import ArraySource, MultiCropConfig, eval_loader, pretrain_loader
from carp_fast.pipelines.sharding import eval_order, pretrain_order, pretrain_steps

TINY = MultiCropConfig(global_crops=1, global_size=8, local_crops=1, local_size=4)


@pytest.mark.parametrize("n,batch_size,num_shards", [(37, 4, 2), (12, 3, 1), (10, 1, 3), (64, 8, 4)])
def test_pretrain_order_covers_once_per_epoch(n, batch_size, num_shards):
    steps = pretrain_steps(n, batch_size, num_shards)
    assert steps == n // (batch_size * num_shards)
    orders = []
    for epoch in range(3):
        shards = [pretrain_order(n, batch_size=batch_size, seed=7, epoch=epoch, shard_id=r, num_shards=num_shards)
                  for r in range(num_shards)]
        assert all(len(s) == steps * batch_size for s in shards)  # equal-length epochs on every rank
        seen = np.concatenate(shards)
        assert len(np.unique(seen)) == len(seen)  # no overlap between or within shards
        assert n - len(seen) < batch_size * num_shards  # only the drop-last remainder is left out
        orders.append(seen)
    assert not np.array_equal(orders[0], orders[1]) and not np.array_equal(orders[1], orders[2])
    # A pure function of (seed, epoch): recomputing epoch 1 gives the same order.
    again = np.concatenate([pretrain_order(n, batch_size=batch_size, seed=7, epoch=1, shard_id=r,
                                           num_shards=num_shards) for r in range(num_shards)])
    np.testing.assert_array_equal(again, orders[1])


def test_eval_order_every_image_exactly_once():
    parts = [eval_order(11, shard_id=r, num_shards=3) for r in range(3)]
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(11))


@pytest.fixture(scope="module")
def numbered():
    """37 images whose label is their index, so a batch's labels say which images it holds."""
    images = np.random.default_rng(0).integers(0, 256, (37, 12, 12), dtype=np.uint8)
    return ArraySource(images, np.arange(37))


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_two_shards_three_epochs_through_the_loaders(numbered, backend):
    loaders = [pretrain_loader(numbered, TINY, batch_size=4, backend=backend, seed=11, shard_id=r, num_shards=2,
                               workers=1) for r in range(2)]
    assert [len(dl) for dl in loaders] == [4, 4]  # floor(37 / (4 * 2))
    epochs = []
    for _ in range(3):
        per_rank = []
        for dl in loaders:
            batches = list(dl)
            assert len(batches) == len(dl)
            assert all(b[0].shape[0] == 4 for b in batches)  # drop-last: only full batches
            per_rank.append(torch.cat([b[-1] for b in batches]).numpy())
        seen = np.concatenate(per_rank)
        assert len(seen) == 32 and len(np.unique(seen)) == 32  # no overlap, 5 images dropped
        assert set(seen) <= set(range(37))
        epochs.append(seen)
    assert all(dl.epoch == 3 for dl in loaders)  # no epoch skipped
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    # Every image is seen in at least one of the three epochs' non-dropped parts (new shuffle each epoch).
    assert len(set(np.concatenate(epochs))) > 32
    # Resume: a fresh loader at epoch 2 reads what the first run read in epoch 2.
    fresh = pretrain_loader(numbered, TINY, batch_size=4, backend=backend, seed=11, shard_id=0, num_shards=2, workers=1)
    fresh.set_epoch(2)
    np.testing.assert_array_equal(torch.cat([b[-1] for b in fresh]).numpy(), epochs[2][:16])


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_eval_shards_exactly_once(numbered, backend):
    loaders = [eval_loader(numbered, size=12, resize=None, batch_size=5, backend=backend, shard_id=r, num_shards=2,
                           workers=1) for r in range(2)]
    assert [len(dl) for dl in loaders] == [4, 4]  # 19 and 18 images, last batch short
    seen = np.concatenate([torch.cat([b[1] for b in dl]).numpy() for dl in loaders])
    np.testing.assert_array_equal(np.sort(seen), np.arange(37))
