"""Two CPU processes (torch.distributed, gloo) against one process on the whole batch."""

import os

import torch
import torch.distributed as dist

from carp_fast.loss import carp_loss, random_partition
from tests.conftest import run_ranks

WORLD, N_PER_RANK, K, B, V_S, V_T = 2, 3, 12, 4, 4, 2


def full_batch_logits():
    g = torch.Generator().manual_seed(0)
    student = [torch.randn(WORLD * N_PER_RANK, K, generator=g, dtype=torch.float64) for _ in range(V_S)]
    teacher = [torch.randn(WORLD * N_PER_RANK, K, generator=g, dtype=torch.float64) for _ in range(V_T)]
    return student, teacher


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        # Different seeds on purpose: the broadcast must still give one partition.
        partition = random_partition(K, B, generator=torch.Generator().manual_seed(100 + rank))
        student, teacher = full_batch_logits()
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        student = [x[rows].clone().requires_grad_() for x in student]
        teacher = [x[rows].clone() for x in teacher]
        parts = carp_loss(student, teacher, partition)
        parts.total.backward()
        # numpy: sent by value, so the tensors outlive this process
        queue.put((rank, (partition.numpy(), [p.detach().numpy() for p in parts], [x.grad.numpy() for x in student])))
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_on_the_concatenated_batch():
    results = {rank: (torch.from_numpy(partition), [torch.tensor(p) for p in parts], [torch.from_numpy(g) for g in grads])
               for rank, (partition, parts, grads) in run_ranks(_worker, WORLD, timeout=120).items()}

    partition = results[0][0]
    assert torch.equal(partition, results[1][0]), "ranks drew different partitions"

    student, teacher = full_batch_logits()
    student = [x.requires_grad_() for x in student]
    single = carp_loss(student, teacher, partition)
    single.total.backward()

    # The entropy term uses the global batch on every rank; the consistency is local.
    for rank in range(WORLD):
        torch.testing.assert_close(results[rank][1][1], single.entropy, rtol=0, atol=1e-12)
    mean_total = sum(results[r][1][2] for r in range(WORLD)) / WORLD
    torch.testing.assert_close(mean_total, single.total, rtol=0, atol=1e-12)

    # DistributedDataParallel averages gradients over ranks: rank r's gradient / WORLD is
    # the one-process gradient of rank r's rows.
    for rank in range(WORLD):
        rows = slice(rank * N_PER_RANK, (rank + 1) * N_PER_RANK)
        for grad, x in zip(results[rank][2], student):
            torch.testing.assert_close(grad / WORLD, x.grad[rows], rtol=0, atol=1e-12)
