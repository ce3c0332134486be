"""The training step of a backbone with each BatchNorm, side by side in one run.

- ``BatchNorm2d``: torch's, each process on its own batch (no synchronisation; the floor);
- ``TorchSyncBatchNorm`` (CUDA only): torch's SyncBatchNorm function, with the device mask that
  makes the host wait at every layer;
- ``GlobalBatchNorm``: :mod:`carp_fast.sync_bn` (fused CUDA kernels on a GPU, the same
  arithmetic in tensor ops on the CPU).

One process in a process group of one, so that the synchronised modules run their whole path
(statistics, collectives, normalisation, backward); the time spent between processes is not
measured. Rounds alternate the modules (A B C A B C ...) so that a machine slowing down during
the run hits them alike; the median round counts.

    python benchmarks/batchnorm_step.py                       # ResNet-50, 2x224 + 6x96, batch 4, bf16
    python benchmarks/batchnorm_step.py --arch resnet18_small --sizes 32 16 --batch-size 32

Also :func:`kernel_agreement`: on a GPU, the largest difference between each fused CUDA kernel
and the CPU formula of :mod:`carp_fast.sync_bn` on the same input (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from carp_fast import sync_bn
from carp_fast.backbones import build_backbone


class TorchSyncBatchNorm(nn.SyncBatchNorm):
    """torch's SyncBatchNorm function (its masked path) even in a group of one, which the
    module itself would skip."""

    def forward(self, x):
        from torch.nn.modules._functions import SyncBatchNorm as function

        self.num_batches_tracked.add_(1)
        group = self.process_group or dist.group.WORLD
        return function.apply(x, self.weight, self.bias, self.running_mean, self.running_var, self.eps, self.momentum,
                              group, dist.get_world_size(group))


@contextlib.contextmanager
def group_of_one(device: torch.device):
    """A torch.distributed process group of this process alone (none made if one exists)."""
    if dist.is_initialized():
        yield
        return
    with tempfile.TemporaryDirectory() as folder:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=f"file://{folder}/store",
                                rank=0, world_size=1)
        try:
            yield
        finally:
            dist.destroy_process_group()


def step_times(arch: str, sizes: list[int], batch_size: int, device: torch.device, precision: str = "bf16",
               steps: int = 3, rounds: int = 3, warmup: int = 1) -> dict:
    """Seconds per forward/backward step of ``arch`` on one crop per size in ``sizes``, with each BatchNorm."""
    norms = [nn.BatchNorm2d] + ([TorchSyncBatchNorm] if device.type == "cuda" else []) + [sync_bn.GlobalBatchNorm]
    gen = torch.Generator().manual_seed(0)
    crops = [torch.randn(batch_size, 3, s, s, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
             for s in sizes]
    torch.manual_seed(0)
    template = build_backbone(arch)
    nets = {}
    for norm in norms:
        net = build_backbone(arch)
        net.load_state_dict(template.state_dict())
        if norm is not nn.BatchNorm2d:
            net = sync_bn.convert_sync_batchnorm(net, norm)
        nets[norm.__name__] = net.to(device).to(memory_format=torch.channels_last).train()

    def step(net):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = sum(net(x).float().square().mean() for x in crops)
        loss.backward()
        net.zero_grad(set_to_none=True)

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    seconds = {name: [] for name in nets}
    with group_of_one(device):
        for net in nets.values():
            for _ in range(warmup):
                step(net)
        for _ in range(rounds):
            for name, net in nets.items():
                synchronize()
                start = time.perf_counter()
                for _ in range(steps):
                    step(net)
                synchronize()
                seconds[name].append((time.perf_counter() - start) / steps)
    result = {f"{name}_ms": round(1000 * statistics.median(s), 2) for name, s in seconds.items()}
    # Paired per round: the two measured back to back, under the same load.
    result |= {f"{name}_over_BatchNorm2d": round(statistics.median(a / b for a, b in zip(s, seconds["BatchNorm2d"])), 3)
               for name, s in seconds.items() if name != "BatchNorm2d"}
    result["rounds_ms"] = {name: [round(1000 * v, 1) for v in s] for name, s in seconds.items()}
    return result


def kernel_agreement(device: torch.device, shape=(16, 64, 14, 14), eps: float = 1e-5) -> dict:
    """The largest absolute difference between each CUDA kernel of :mod:`carp_fast.sync_bn` and its
    CPU formula, on the same bf16 input (channels_last) and the same gathered statistics."""
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    dy = torch.randn(shape, generator=gen).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    weight, bias = torch.rand(shape[1], generator=gen) + 0.5, torch.randn(shape[1], generator=gen)
    counts = torch.tensor([shape[0] * shape[2] * shape[3]] * 2, dtype=torch.float32)

    def run(on):
        t = [v.to(on) for v in (x, dy, weight, bias, counts)]
        xs, dys, w, b, n = t
        mean, invstd = sync_bn.local_stats(xs, eps)
        mean_all, invstd_all = torch.stack([mean, mean + 0.1]), torch.stack([invstd, invstd * 0.9])  # a second rank
        rm, rv = torch.zeros_like(mean), torch.ones_like(mean)
        g_mean, g_invstd = sync_bn.global_stats(xs, mean_all, invstd_all, rm, rv, 0.1, eps, n)
        y = sync_bn.normalise(xs, w, b, g_mean, g_invstd, eps)
        sum_dy, sum_dy_xmu, gw, gb = sync_bn.backward_reduce(dys, xs, g_mean, g_invstd, w, (True, True, True))
        gx = sync_bn.backward_input(dys, xs, g_mean, g_invstd, w, 2 * sum_dy, 2 * sum_dy_xmu, n.to(torch.int32))
        return dict(local_stats=(mean, invstd), global_stats=(g_mean, g_invstd, rm, rv), normalise=(y,),
                    backward_reduce=(sum_dy, sum_dy_xmu, gw, gb), backward_input=(gx,))

    cuda, cpu = run(device), run(torch.device("cpu"))
    return {name: max(float((a.float().cpu() - b.float()).abs().max()) for a, b in zip(cuda[name], cpu[name]))
            for name in cuda}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="resnet50")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 224, 96, 96, 96, 96, 96, 96],
                        help="one crop per size (default: the ImageNet recipe's 2x224 + 6x96)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    result = {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "threads": torch.get_num_threads()}
    result |= vars(args) | step_times(args.arch, args.sizes, args.batch_size, device, args.precision, args.steps, args.rounds)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
