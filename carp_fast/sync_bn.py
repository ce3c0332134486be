"""BatchNorm over the whole distributed batch, with no host wait, on any device.

Why not ``torch.nn.SyncBatchNorm``: it runs only on GPUs, and its forward drops the
statistics of empty ranks with a mask computed on the device (``count_all[mask]``), which
makes the host wait for the GPU at every BatchNorm layer (163 calls per CARP micro-batch
with ResNet-50), so the CPU can never queue work ahead and one slow rank stalls all of them
at every layer. Here every rank always holds a non-empty batch of the same size (the
loaders drop the last partial batch), so the mask is not needed.

:class:`GlobalBatchNorm` is one module for every device. Its arithmetic is torch's
SyncBatchNorm without the mask, in four steps, each a fused kernel on CUDA and the same
formula in a few tensor ops elsewhere:

1. local statistics: each rank's per-channel mean and ``invstd = 1 / sqrt(var + eps)``
   (``torch.batch_norm_stats`` on CUDA);
2. one all-gather of ``[mean, invstd, count]`` (``W x (2C + 1)``), combined into the global
   mean and biased variance (the parallel-variance formula, exact, no sum of squares), and
   the running statistics updated with the unbiased variance
   (``torch.batch_norm_gather_stats_with_counts``; counts are built on the device);
3. the normalisation, in float32, written in the input's dtype (``torch.batch_norm_elemt``);
4. backward: local ``sum(dy)`` and ``sum(dy * (x - mean))`` (``torch.batch_norm_backward_reduce``),
   one all-reduce of both, then the input gradient (``torch.batch_norm_backward_elemt``).
   Weight and bias gradients stay local: DistributedDataParallel averages them.

Statistics are float32 whatever the autocast: bf16 sums over a batch lose the variance.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor


def local_stats(x: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per-channel mean and ``1 / sqrt(biased var + eps)`` of ``x [N, C, ...]``: two ``[C]`` float32."""
    if x.is_cuda:
        return torch.batch_norm_stats(x, eps)
    # torch's CPU kernel, fused; an fp32 weight makes it keep fp32 statistics for a bf16 input
    # (its normalised output is not used).
    ones = torch.ones(x.shape[1], dtype=torch.float32, device=x.device)
    _, mean, invstd = torch.native_batch_norm(x, ones, None, None, None, True, 0.0, eps)
    return mean, invstd


def global_stats(x: Tensor, mean_all: Tensor, invstd_all: Tensor, running_mean: Tensor | None,
                 running_var: Tensor | None, momentum: float, eps: float, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and invstd (``[C]``) of the union of the ranks' batches from their ``[W, C]`` stats and
    ``[W]`` counts; the running statistics move by ``momentum`` toward the mean and the unbiased var."""
    if x.is_cuda:
        return torch.batch_norm_gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var,
                                                         momentum, eps, counts)
    n = counts.sum()
    weights = (counts / n)[:, None]  # [W, 1]
    mean = (weights * mean_all).sum(0)
    var_all = invstd_all.pow(-2) - eps  # each rank's biased variance, as the CUDA kernel recovers it
    var = (weights * (var_all + (mean_all - mean).pow(2))).sum(0)
    if running_mean is not None:
        running_mean.lerp_(mean.to(running_mean.dtype), momentum)
    if running_var is not None:
        running_var.lerp_((var * n / (n - 1)).to(running_var.dtype), momentum)
    return mean, torch.rsqrt(var + eps)


def normalise(x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, invstd: Tensor, eps: float) -> Tensor:
    """``(x - mean) * invstd * weight + bias`` per channel, computed in float32, in ``x``'s dtype."""
    if x.is_cuda:
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, eps)
    # torch's CPU kernel (one pass, the input's dtype kept) with the global statistics as its
    # running ones: it normalises with 1 / sqrt(var + eps), the invstd given.
    return F.batch_norm(x, mean, invstd.pow(-2) - eps, weight, bias, training=False, momentum=0.0, eps=eps)


def backward_reduce(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                    needs: tuple[bool, bool, bool]) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """This rank's ``sum(dy)`` and ``sum(dy * (x - mean))`` (``[C]``), and its weight and bias gradients."""
    if x.is_cuda:
        return torch.batch_norm_backward_reduce(dy, x, mean, invstd, weight, *needs)
    # torch's CPU backward kernel (one fused pass) with the global statistics as the saved ones:
    # its bias gradient is sum(dy), its weight gradient sum(dy * (x - mean)) * invstd.
    ones = torch.ones_like(mean) if weight is None else weight
    _, grad_w, sum_dy = torch.ops.aten.native_batch_norm_backward(dy, x, ones, None, None, mean, invstd, True, 0.0,
                                                                  [False, True, True])
    sum_dy_xmu = grad_w.float() / invstd
    return (sum_dy.float(), sum_dy_xmu, grad_w if weight is not None and needs[1] else None,
            sum_dy if weight is not None and needs[2] else None)


def backward_input(dy: Tensor, x: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None,
                   sum_dy: Tensor, sum_dy_xmu: Tensor, counts: Tensor) -> Tensor:
    """The input gradient from the all-reduced sums (``[C]``) and the ``[W]`` int32 counts."""
    if x.is_cuda:
        return torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)
    # torch's fused CPU backward with the global statistics gives the formula with this rank's
    # own means of dy and dy * (x - mean) (L1, L2, from its bias and weight gradients); the
    # formula with the global ones (G1, G2) differs by a per-channel affine function of x:
    #   dx = dx_local + (x - mean) * invstd^3 * w * (L2 - G2) + invstd * w * (L1 - G1),
    # which torch's fused inference BatchNorm computes (mean as its mean, variance 1 - eps).
    ones = torch.ones_like(mean)
    w = ones if weight is None else weight.float()
    dx_local, grad_w, grad_b = torch.ops.aten.native_batch_norm_backward(dy, x, w, None, None, mean, invstd, True, 0.0,
                                                                          [True, True, True])
    n_local, n = x.numel() // x.shape[1], counts.sum().float()
    local_dy, local_dy_xmu = grad_b.float() / n_local, grad_w.float() / invstd / n_local
    slope = invstd.pow(3) * w * (local_dy_xmu - sum_dy_xmu / n)
    offset = invstd * w * (local_dy - sum_dy / n)
    tiny = 1e-5  # variance 1 - tiny plus eps tiny: a scale of exactly 1
    return dx_local + F.batch_norm(x, mean, ones - tiny, slope, offset, training=False, momentum=0.0, eps=tiny)


def _all_gather_rows(row: Tensor, group) -> Tensor:
    """``[W, len(row)]``: every rank's ``row``, in rank order."""
    world = dist.get_world_size(group)
    if dist.get_backend(group) == "gloo":  # gloo has no all_gather_into_tensor
        rows = [torch.empty_like(row) for _ in range(world)]
        dist.all_gather(rows, row, group)
        return torch.stack(rows)
    out = torch.empty(world, row.numel(), dtype=row.dtype, device=row.device)
    dist.all_gather_into_tensor(out, row, group)
    return out


class _GlobalBatchNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, group):
        with torch.autocast(x.device.type, enabled=False):
            mean, invstd = local_stats(x, eps)
            # The count from the shape (a host int) written on the device: no read back.
            count = torch.full((1,), x.numel() // x.shape[1], dtype=mean.dtype, device=x.device)
            gathered = _all_gather_rows(torch.cat([mean, invstd, count]), group)  # [W, 2C + 1]
            channels = x.shape[1]
            mean_all, invstd_all, count_all = gathered.split([channels, channels, 1], dim=1)
            counts = count_all.view(-1)
            if running_mean is not None:
                counts = counts.to(running_mean.dtype)
            mean, invstd = global_stats(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts)
            ctx.save_for_backward(x, weight, mean, invstd, count_all.view(-1).to(torch.int32))
            ctx.group = group
            return normalise(x, weight, bias, mean, invstd, eps)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mean, invstd, counts = ctx.saved_tensors
        if not (dy.is_contiguous(memory_format=torch.channels_last) or dy.is_contiguous(memory_format=torch.channels_last_3d)):
            dy = dy.contiguous()  # the fused kernels take either layout, as torch's SyncBatchNorm
        with torch.autocast(x.device.type, enabled=False):
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = backward_reduce(dy, x, mean, invstd, weight, ctx.needs_input_grad[:3])
            grad_x = None
            if ctx.needs_input_grad[0]:
                sums = torch.cat([sum_dy, sum_dy_xmu])
                dist.all_reduce(sums, group=ctx.group)
                sum_dy, sum_dy_xmu = sums.split(sum_dy.numel())
                if weight is not None and weight.dtype != mean.dtype:
                    weight = weight.to(mean.dtype)
                grad_x = backward_input(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, counts)
        return grad_x, grad_weight, grad_bias, None, None, None, None, None


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the whole distributed batch (input ``[N, C]`` or ``[N, C, H, W]``, ``N >= 1``
    on every rank), output in the input's dtype. In evaluation, or without torch.distributed, it
    is ``nn.BatchNorm``; the state dict is the same as ``nn.BatchNorm``'s."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group  # None: the default group

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected input [N, C, ...] with 2 to 5 dimensions, got {tuple(x.shape)}")

    def forward(self, x: Tensor) -> Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        self._check_input_dim(x)
        if x.shape[0] == 0:
            raise ValueError("GlobalBatchNorm: every rank needs a non-empty batch (drop_last in the loaders)")
        momentum = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if momentum is None:  # a cumulative average, as nn.BatchNorm (this reads the count back)
                momentum = 1.0 / float(self.num_batches_tracked)
        group = self.process_group or dist.group.WORLD
        running = (self.running_mean, self.running_var) if self.track_running_stats else (None, None)
        return _GlobalBatchNormFunction.apply(x, self.weight, self.bias, *running, self.eps, momentum or 0.0, group)


def convert_sync_batchnorm(module: nn.Module, norm: type[nn.modules.batchnorm._BatchNorm] = GlobalBatchNorm) -> nn.Module:
    """Every BatchNorm of ``module`` replaced, in place, by ``norm`` (:class:`GlobalBatchNorm`, or
    ``nn.SyncBatchNorm`` to compare), with its parameters, buffers and modes."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, norm):
        new = norm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        state = next(iter(module.state_dict().values()), None)
        if state is not None:
            new.to(state.device)
        for p_new, p_old in zip(new.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, norm))
    return module
