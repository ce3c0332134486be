"""2 CPU processes: a slow k-NN monitor on rank 0 does not time the others out; DDP does not
re-broadcast buffers, yet the teacher and partition state stay equal on both ranks (issue 12)."""

import os
import time
import traceback

import pytest

from tests.conftest import crop_dataset, run_ranks

TIMEOUT_S, KNN_S = 10, 20  # the collectives' timeout, and a k-NN evaluation twice as long


def _worker(rank, port, queue):
    try:
        queue.put((rank, _train(rank, port)))
    except Exception:  # report it now rather than let the parent wait for its timeout
        queue.put((rank, {"error": traceback.format_exc()}))


def _train(rank, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", ACCELERATE_USE_CPU="1")
    from datetime import timedelta

    import torch
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs
    from fastai.data.core import DataLoaders
    from torch.utils.data import DataLoader, Subset

    from carp_fast.callbacks import KNNMonitor
    from carp_fast.carp import CARPConfig, carp_learner

    class SlowKNN(KNNMonitor):
        def evaluate(self):
            time.sleep(KNN_S)
            return 50.0, 90.0

    # Everything is imported before the process group starts, so its short timeout only
    # measures waits inside the run.
    accelerator = Accelerator(cpu=True, kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=TIMEOUT_S))])
    data = crop_dataset(n_images=16, seed=rank)
    dls = DataLoaders(DataLoader(data, batch_size=4), DataLoader(Subset(data, []), batch_size=4))
    config = CARPConfig(arch="resnet10_tiny", n_prototypes=64, block_size=16, hidden_dim=32, embed_dim=16,
                        batch_size=4, global_batch=16, precision="fp32", log_every=1)  # 2 micro-batches a step
    torch.manual_seed(0)
    monitor = SlowKNN(None, None, every=1)
    learn = carp_learner(dls, config, accelerator=accelerator, cbs=[monitor], progress=False)
    learn.fit(2)
    state = {k: v.numpy() for k, v in learn.model.module.state_dict().items() if isinstance(v, torch.Tensor)}
    state["partition_generator"] = learn.model.module.partitioner._generator.get_state().numpy()
    return dict(broadcast_buffers=learn.model.broadcast_buffers, knn=monitor.history, state=state)


@pytest.fixture(scope="module")
def two_ranks():
    results = run_ranks(_worker, 2, timeout=300)
    for rank, result in results.items():
        assert "error" not in result, f"rank {rank}: {result['error']}"
    return results


@pytest.mark.slow
def test_slow_knn_monitor_on_rank_0_does_not_time_out_the_others(two_ranks):
    assert [r["epoch"] for r in two_ranks[0]["knn"]] == [0, 1]
    assert two_ranks[1]["knn"] == []  # rank 1 waited, it did not evaluate


@pytest.mark.slow
def test_ddp_does_not_broadcast_buffers_and_the_ranks_stay_equal(two_ranks):
    import numpy as np

    assert two_ranks[0]["broadcast_buffers"] is False and two_ranks[1]["broadcast_buffers"] is False
    a, b = two_ranks[0]["state"], two_ranks[1]["state"]
    assert a.keys() == b.keys() and any("teacher" in k and "running_mean" in k for k in a)
    for key in a:
        assert np.array_equal(a[key], b[key]), key
