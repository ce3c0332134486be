"""No operation that makes a GPU's host wait runs between logging steps, counted on the CPU.

The counter (:mod:`carp_fast.host_syncs`) is checked first on operations known to wait
(so that a silent counter cannot pass), then held to zero over two-process fits of CARP
and MaSSL with the callbacks of a real run (preemption included), in fp32 and bf16.
"""

import os

import pytest
import torch

from tests.conftest import crop_dataset, run_ranks

LOG_EVERY, BATCHES = 4, 12
# Reads of host values, allowed at any step: flags all-reduced as CPU tensors over gloo
# (carp_fast.distributed._host_group), never on a GPU stream; the step count that torch's
# optimizers keep on the host (``capturable=False``, the default) for the bias correction.
HOST_VALUES = ("distributed.py:shared_flags", "distributed.py:main_process_value", "optimizer.py:_get_value")


def test_the_counter_sees_each_kind_of_host_wait():
    from carp_fast.host_syncs import HostSyncs

    x = torch.randn(6)
    with HostSyncs() as counter:
        x.sum().item()
        bool(x[0] > 0)
        x[x > 0]
        torch.nonzero(x)
        x.tolist()
        x.cpu()
        torch.unique(x)
        torch.masked_select(x, x > 0)
        y = x * 2 + 1  # none of these wait
        torch.where(x > 0, x, y).sum()
    ops = [e.op for e in counter.events]
    assert ops == ["aten._local_scalar_dense", "aten._local_scalar_dense", "aten.index (boolean mask)",
                   "aten.nonzero", "Tensor.tolist", "Tensor.cpu", "aten._unique2", "aten.masked_select"]


def _fit_events(method, precision, rank=0, world=1):
    """The host waits of a fit (``(op, iteration, where)``) and the model's GlobalBatchNorm count."""
    from fastai.data.core import DataLoaders
    from torch.utils.data import DataLoader, Subset

    from carp_fast.callbacks.preemption import Preemption
    from carp_fast.host_syncs import HostSyncs

    common = dict(arch="resnet10_tiny", block_size=16, hidden_dim=32, embed_dim=16, batch_size=4, global_batch=8,
                  log_every=LOG_EVERY, precision=precision)
    if method == "carp":
        from carp_fast.carp import CARPConfig, carp_learner as make
        config = CARPConfig(n_prototypes=64, base_lr=2.0, optimizer="lars", **common)
    else:
        from carp_fast.massl import MaSSLConfig, massl_learner as make
        config = MaSSLConfig(memory_size=64, base_lr=0.05, drop_path=0.0, teacher_temperature_epochs=1, **common)
    data = crop_dataset(n_images=world * 4 * BATCHES, seed=3)
    rows = list(range(rank, len(data), world))
    dls = DataLoaders(DataLoader(Subset(data, rows), batch_size=4, drop_last=True),
                      DataLoader(Subset(data, []), batch_size=4))
    learn = make(dls, config, progress=False, cbs=[Preemption(minutes=60)])
    counter = HostSyncs()
    learn.add_cb(counter.labels())
    with counter:
        learn.fit(1)
    batchnorms = sum(type(m).__name__ == "GlobalBatchNorm" for m in learn.model.modules())
    return [(e.op, e.iteration, e.where) for e in counter.events], batchnorms


def _between_logging_steps(events):
    logging = {i for i in range(BATCHES) if (i + 1) % LOG_EVERY == 0}
    steps = [e for e in events if e[1] is not None]
    assert steps or not events, "events were seen but none inside a batch: the labels did not reach the batches"
    return [e for e in steps if e[1] not in logging and e[2] not in HOST_VALUES]


def _worker(rank, port, queue, method, precision):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", ACCELERATE_USE_CPU="1")
    queue.put((rank, _fit_events(method, precision, rank, world=2)))


@pytest.mark.parametrize("method", ["carp", "massl"])
def test_a_one_process_fit_makes_the_host_wait_only_at_logging_steps(method):
    events, _ = _fit_events(method, "fp32")
    assert any(e[1] is not None for e in events)  # the logging steps were seen: the counter works in a fit
    assert _between_logging_steps(events) == []


@pytest.mark.slow
@pytest.mark.parametrize("method,precision", [("carp", "fp32"), ("carp", "bf16"), ("massl", "fp32")])
def test_a_two_process_fit_makes_the_host_wait_only_at_logging_steps(method, precision):
    from functools import partial

    results = run_ranks(partial(_worker, method=method, precision=precision), 2, timeout=600)
    for rank, (events, batchnorms) in results.items():
        assert batchnorms > 0  # the synchronised BatchNorm is in the model
        assert any(e[1] is not None for e in events)
        between = _between_logging_steps(events)
        assert between == [], f"rank {rank}: host waits between logging steps: {between}"


def _nccl_like_worker(rank, port, queue):
    """A default group that claims to be NCCL: the flags still travel over a gloo group, on the CPU."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist

    from carp_fast import distributed

    dist.init_process_group("gloo", rank=rank, world_size=2)
    distributed.dist.get_backend = lambda group=None: "nccl" if group is None else "gloo"
    flags = distributed.shared_flags(rank == 1, False)
    value = distributed.main_process_value(7 if rank == 0 else 3)
    group = distributed._host_group()
    queue.put((rank, (flags, value, group is not None, group is distributed._host_group())))
    dist.destroy_process_group()


def test_flags_travel_over_a_gloo_group_when_the_default_group_is_nccl():
    results = run_ranks(_nccl_like_worker, 2, timeout=120)
    for rank in (0, 1):
        assert results[rank] == ((True, False), 7, True, True)  # agreed values, one gloo group made once
