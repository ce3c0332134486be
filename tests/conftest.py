"""Shared fixtures: tiny CARP data and configurations that train in seconds on a CPU."""

import socket

import pytest
import torch
import torch.multiprocessing as mp
from torch.utils.data import DataLoader, TensorDataset


def crop_dataset(n_images=32, n_global=2, n_local=2, g=16, l=8, n_classes=4, seed=0):
    """Random crops and labels as a TensorDataset of (g_0, ..., l_{m-1}, labels)."""
    gen = torch.Generator().manual_seed(seed)
    views = [torch.randn(n_images, 3, g, g, generator=gen) for _ in range(n_global)]
    views += [torch.randn(n_images, 3, l, l, generator=gen) for _ in range(n_local)]
    return TensorDataset(*views, torch.randint(0, n_classes, (n_images,), generator=gen))


def run_ranks(worker, world_size: int, timeout: float) -> dict:
    """Run ``worker(rank, port, queue)`` in ``world_size`` spawned processes that share a free
    local port; each puts ``(rank, payload)`` on the queue (numpy arrays: sent by value).

    Returns ``{rank: payload}``; fails if a process exits with an error.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(rank, port, queue)) for rank in range(world_size)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=timeout) for _ in range(world_size))
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    return results


@pytest.fixture(autouse=True)
def scan_cache_folder(tmp_path_factory, monkeypatch):
    """Each test keeps its pre-flight scans in a folder of its own, never in ~/.cache."""
    folder = tmp_path_factory.mktemp("carp_fast_cache")
    monkeypatch.setenv("CARP_FAST_CACHE", str(folder))
    return folder


@pytest.fixture
def tiny_dls():
    """fastai DataLoaders over random 2x16 px + 2x8 px crops, batch 8, no validation."""
    from fastai.data.core import DataLoaders

    train = DataLoader(crop_dataset(), batch_size=8, shuffle=False, drop_last=True)
    valid = DataLoader(crop_dataset(n_images=0), batch_size=8)
    return DataLoaders(train, valid)


@pytest.fixture
def tiny_config():
    from carp_fast.carp import CARPConfig

    return CARPConfig(
        arch="resnet18_small", n_prototypes=64, block_size=16, hidden_dim=32, embed_dim=16,
        batch_size=8, global_batch=8, base_lr=0.5, log_every=2, precision="fp32",
    )
