"""GlobalBatchNorm in two gloo processes equals ``nn.BatchNorm`` over the concatenated batch:
outputs, input / weight / bias gradients, running statistics; fp32 and bf16 inputs, channels
first and channels_last, ranks of unequal batch sizes. The reference is torch's own
single-process BatchNorm, which shares no code with the module under test."""

import os

import pytest
import torch
import torch.nn as nn

from tests.conftest import run_ranks

# (shape of rank 0's input, rank 1's batch size, dtype, channels_last)
CASES = [
    ((6, 5, 4, 3), 6, torch.float32, False),
    ((6, 5, 4, 3), 10, torch.float32, True),  # unequal batches: the counts weight the ranks
    ((8, 7), 8, torch.float32, False),  # [N, C] as after a Linear (the projection head)
    ((6, 5, 4, 3), 6, torch.bfloat16, True),  # autocast's dtype, in the training layout
]


def _inputs(case, rank):
    shape, n1, dtype, channels_last = case
    shape = (shape[0] if rank == 0 else n1,) + shape[1:]
    g = torch.Generator().manual_seed(10 + rank)
    x = (torch.randn(shape, generator=g) * 3 + 50).to(dtype)  # a large mean: a sum of squares would lose the variance
    dy = torch.randn(shape, generator=g).to(dtype)  # d loss / d output
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    return x, dy


def _module(channels):
    from carp_fast.sync_bn import GlobalBatchNorm

    bn = GlobalBatchNorm(channels, momentum=0.3).train()
    with torch.no_grad():
        bn.weight.copy_(torch.linspace(0.5, 2.0, channels))
        bn.bias.copy_(torch.linspace(-1.0, 1.0, channels))
    return bn


def _worker(rank, port, queue):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=2)
    out = []
    for case in CASES:
        x, dy = _inputs(case, rank)
        x.requires_grad_(True)
        bn = _module(x.shape[1])
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=x.dtype == torch.bfloat16):
            y = bn(x)
            bn(x.detach())  # a second step: the running statistics move twice
        y.backward(dy)
        out.append(dict(y=y.detach().float().numpy(), dtype=str(y.dtype), grad=x.grad.float().numpy(),
                        gw=bn.weight.grad.numpy(), gb=bn.bias.grad.numpy(), rm=bn.running_mean.numpy(),
                        rv=bn.running_var.numpy(), n=int(bn.num_batches_tracked), cl=y.is_contiguous(memory_format=torch.channels_last)))
    dist.destroy_process_group()
    queue.put((rank, out))


@pytest.fixture(scope="module")
def two_ranks():
    return run_ranks(_worker, 2, timeout=300)


@pytest.mark.parametrize("index", range(len(CASES)))
def test_two_ranks_equal_one_batchnorm_over_the_concatenated_batch(two_ranks, index):
    case = CASES[index]
    dtype = case[2]
    xs, dys = zip(*(_inputs(case, r) for r in (0, 1)))
    x = torch.cat([t.float() for t in xs]).requires_grad_(True)  # the ranks' (rounded) inputs, in float32
    reference = nn.BatchNorm1d(x.shape[1]) if x.dim() == 2 else nn.BatchNorm2d(x.shape[1])
    reference.momentum = 0.3
    with torch.no_grad():
        reference.weight.copy_(torch.linspace(0.5, 2.0, x.shape[1]))
        reference.bias.copy_(torch.linspace(-1.0, 1.0, x.shape[1]))
    y = reference(x)
    reference(x.detach())
    y.backward(torch.cat([t.float() for t in dys]))

    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)  # bf16 outputs
    rows = [0, len(xs[0]), len(x)]
    for rank in (0, 1):
        got = two_ranks[rank][index]
        part = slice(rows[rank], rows[rank + 1])
        assert got["dtype"] == str(dtype)  # written in the input's dtype, as nn.BatchNorm on the CPU and cuDNN
        assert got["cl"] == case[3]  # the memory layout kept
        torch.testing.assert_close(torch.from_numpy(got["y"]), y[part].detach(), **tol)
        torch.testing.assert_close(torch.from_numpy(got["grad"]), x.grad[part], **tol)
        # Statistics are float32 whatever the input: the running buffers match tightly.
        torch.testing.assert_close(torch.from_numpy(got["rm"]), reference.running_mean, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(torch.from_numpy(got["rv"]), reference.running_var, rtol=1e-4, atol=1e-4)
        assert got["n"] == 2
    # Weight and bias gradients stay local (DDP averages them); their sum is the whole batch's.
    for key, expected in (("gw", reference.weight.grad), ("gb", reference.bias.grad)):
        total = torch.from_numpy(two_ranks[0][index][key]) + torch.from_numpy(two_ranks[1][index][key])
        torch.testing.assert_close(total, expected, rtol=1e-4 if dtype == torch.float32 else 2e-2, atol=1e-3)


def test_without_torch_distributed_or_in_evaluation_it_is_batchnorm():
    x = torch.randn(6, 5, 4, 3)
    bn, reference = _module(5), nn.BatchNorm2d(5, momentum=0.3)
    reference.load_state_dict(bn.state_dict())
    torch.testing.assert_close(bn(x), reference(x))  # training, no process group
    torch.testing.assert_close(bn.eval()(x), reference.eval()(x))
    torch.testing.assert_close(bn.running_var, reference.running_var)


def test_convert_replaces_every_batchnorm_and_keeps_state_and_frozen_parameters():
    from carp_fast.sync_bn import GlobalBatchNorm, convert_sync_batchnorm

    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)))
    with torch.no_grad():
        model[1].running_mean.fill_(0.5)
    model[2][1].weight.requires_grad_(False)
    model.eval()
    keys = set(model.state_dict())
    converted = convert_sync_batchnorm(model)
    assert [type(m) for m in converted.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)] == [GlobalBatchNorm] * 2
    assert torch.all(converted[1].running_mean == 0.5)
    assert not converted[2][1].weight.requires_grad and not converted[1].training
    assert set(converted.state_dict()) == keys  # checkpoints of either load into the other
