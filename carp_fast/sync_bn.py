"""Batch statistics over all processes, on any device.

``torch.nn.SyncBatchNorm`` only runs on GPUs; on CPU processes (gloo) each rank would
normalise with its own half batch, and a 2-process run would no longer equal a 1-process
run with the same global batch. :func:`convert_sync_batchnorm` uses torch's SyncBatchNorm
on CUDA and, elsewhere, :class:`AllReduceBatchNorm`: the same arithmetic (global mean and
biased variance for normalising, unbiased for the running variance) with the sums
all-reduced by ``torch.distributed.nn``, which carries the gradients back.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn


class AllReduceBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm over the whole distributed batch (input ``[N, C]`` or ``[N, C, H, W]``)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 3, 4, 5):
            raise ValueError(f"expected input [N, C, ...] with 2 to 5 dimensions, got {tuple(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        import torch.distributed.nn.functional as dist_fn

        # Statistics in float32, as autocast runs BatchNorm: bf16 sums of squares over a batch
        # lose the variance, and the running buffers are float32.
        x = x.float()
        dims = [0] + list(range(2, x.dim()))  # all but channels
        count = torch.tensor(float(x.numel() // x.shape[1]), dtype=x.dtype, device=x.device)
        sums = torch.cat([x.sum(dims), (x * x).sum(dims), count[None]])  # [2C + 1]
        sums = dist_fn.all_reduce(sums)
        channels = x.shape[1]
        n = sums[-1]
        mean = sums[:channels] / n
        var = sums[channels : 2 * channels] / n - mean * mean  # biased, as BatchNorm normalises
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                self.running_mean.lerp_(mean.detach(), momentum)
                self.running_var.lerp_((var * n / (n - 1)).detach(), momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        y = (x - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


def convert_sync_batchnorm(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm of ``module`` synchronised across processes (torch's on CUDA)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _replace(module)


def _replace(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.modules.batchnorm._BatchNorm) and not isinstance(module, AllReduceBatchNorm):
        new = AllReduceBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        for p_new, p_old in zip(new.parameters(), module.parameters()):
            p_new.requires_grad_(p_old.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, _replace(child))
    return module

