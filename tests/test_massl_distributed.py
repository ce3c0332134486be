"""A 2-process CPU MaSSL run (gloo, through Accelerate) equals a 1-process run with the same global batch."""

import os

import pytest
import torch

from tests.conftest import crop_dataset, run_ranks

STEPS, GLOBAL, MEMORY = 3, 8, 16  # the memory wraps around during the run


def _run(rows_per_step, batch_size):
    """Train STEPS steps of a tiny ViT; step k uses images rows_per_step[k].

    Returns (losses, student parameters, memory, pointer)."""
    from fastai.data.core import DataLoaders
    from torch.utils.data import DataLoader, Subset

    from carp_fast.massl import MaSSLConfig, massl_learner
    from carp_fast.massl import MaSSLStudentTeacher
    from tests.test_massl_memory import tiny_vit

    data = crop_dataset(n_images=STEPS * GLOBAL, seed=3)
    order = [i for rows in rows_per_step for i in rows]
    train = DataLoader(Subset(data, order), batch_size=batch_size, shuffle=False)
    dls = DataLoaders(train, DataLoader(Subset(data, []), batch_size=batch_size))
    config = MaSSLConfig(
        arch="resnet10_tiny", memory_size=MEMORY, block_size=4, hidden_dim=24, embed_dim=8, batch_size=batch_size,
        global_batch=GLOBAL, base_lr=0.05, log_every=1, precision="fp32", drop_path=0.0, teacher_momentum=0.9,
        teacher_temperature_epochs=1, clip_grad=0.01,  # small enough to clip: clipping must act the same on both ranks
    )
    torch.manual_seed(0)
    model = MaSSLStudentTeacher(tiny_vit, memory_size=MEMORY, block_size=4, hidden_dim=24, embed_dim=8, drop_path=0.0)
    learn = massl_learner(dls, config, progress=False, model=model)
    learn.fit(1)
    losses = [r["loss"] for r in learn.massl_stats.history]
    model = getattr(learn.model, "module", learn.model)
    params = [p.detach().clone() for p in model.student.parameters()]
    return losses, params, model.memory.embeddings.clone(), int(model.memory.pointer)


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", ACCELERATE_USE_CPU="1")
    half = GLOBAL // 2
    rows = [list(range(k * GLOBAL + rank * half, k * GLOBAL + (rank + 1) * half)) for k in range(STEPS)]
    losses, params, memory, pointer = _run(rows, batch_size=half)
    queue.put((rank, (losses, [p.numpy() for p in params], memory.numpy(), pointer)))


@pytest.mark.slow
def test_two_process_run_holds_the_same_memory_and_takes_the_same_steps_as_one_process():
    results = run_ranks(_worker, 2, timeout=300)
    single_losses, single_params, single_memory, single_pointer = _run(
        [list(range(k * GLOBAL, (k + 1) * GLOBAL)) for k in range(STEPS)], batch_size=GLOBAL
    )
    memories = [torch.from_numpy(results[r][2]) for r in (0, 1)]
    # Every rank holds the same memory (written from all ranks' gathered rows), equal to one process's.
    torch.testing.assert_close(memories[0], memories[1], rtol=0, atol=0)
    torch.testing.assert_close(memories[0], single_memory, rtol=1e-4, atol=1e-5)
    assert results[0][3] == results[1][3] == single_pointer == (STEPS * GLOBAL) % MEMORY
    assert not torch.allclose(single_memory, torch.nn.functional.normalize(
        torch.randn(MEMORY, 8, generator=torch.Generator().manual_seed(0)), dim=1))  # the run wrote it
    # The ranks hold identical weights (DDP) equal to the 1-process weights.
    for a, b, c in zip(results[0][1], results[1][1], single_params):
        a, b = torch.from_numpy(a), torch.from_numpy(b)
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(a, c, rtol=1e-4, atol=1e-5)
    # Per-rank losses average (equal halves) to the 1-process loss of each step.
    for step in range(STEPS):
        mean = (results[0][0][step] + results[1][0][step]) / 2
        assert mean == pytest.approx(single_losses[step], rel=1e-5)
