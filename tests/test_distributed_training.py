"""A 2-process CPU run (gloo, through Accelerate) equals a 1-process run with the same global batch."""

import os

import pytest
import torch

from tests.conftest import crop_dataset, run_ranks

STEPS, GLOBAL = 2, 16


def _config(batch_size):
    from carp_fast.carp import CARPConfig

    return CARPConfig(
        arch="resnet10_tiny", n_prototypes=64, block_size=16, hidden_dim=32, embed_dim=16, batch_size=batch_size,
        global_batch=GLOBAL, base_lr=2.0, log_every=1, precision="fp32", optimizer="lars",
    )


def _run(rows_per_step, batch_size):
    """Train STEPS steps; step k uses images rows_per_step[k]. Returns (losses, student params)."""
    from fastai.data.core import DataLoaders
    from torch.utils.data import DataLoader, Subset

    from carp_fast.carp import carp_learner

    data = crop_dataset(n_images=STEPS * GLOBAL, seed=3)
    order = [i for rows in rows_per_step for i in rows]
    train = DataLoader(Subset(data, order), batch_size=batch_size, shuffle=False)
    dls = DataLoaders(train, DataLoader(Subset(data, []), batch_size=batch_size))
    torch.manual_seed(0)
    learn = carp_learner(dls, _config(batch_size), progress=False)
    learn.fit(1)
    losses = [r["loss"] for r in learn.carp_stats.history]
    model = getattr(learn.model, "module", learn.model)
    return losses, [p.detach().clone() for p in model.student.parameters()]


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", ACCELERATE_USE_CPU="1")
    half = GLOBAL // 2
    rows = [list(range(k * GLOBAL + rank * half, k * GLOBAL + (rank + 1) * half)) for k in range(STEPS)]
    losses, params = _run(rows, batch_size=half)
    queue.put((rank, (losses, [p.numpy() for p in params])))


@pytest.mark.slow
def test_two_process_run_equals_one_process_run():
    results = {rank: (losses, [torch.from_numpy(p) for p in params])
               for rank, (losses, params) in run_ranks(_worker, 2, timeout=300).items()}

    single_losses, single_params = _run([list(range(k * GLOBAL, (k + 1) * GLOBAL)) for k in range(STEPS)], batch_size=GLOBAL)
    # The ranks hold identical weights (DDP) equal to the 1-process weights.
    for a, b, c in zip(results[0][1], results[1][1], single_params):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    # Per-rank losses average (equal halves) to the 1-process loss of each step.
    for step in range(STEPS):
        mean = (results[0][0][step] + results[1][0][step]) / 2
        assert mean == pytest.approx(single_losses[step], rel=1e-5)
    assert single_params  # the run trained something
