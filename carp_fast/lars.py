"""LARS (You et al. 2017) as used by the paper's official code and by DINO / BYOL.

For a parameter ``p`` with more than one dimension (weights of convolutions, linear
layers and prototypes)::

    d = grad + weight_decay * p
    d = d * eta * ||p|| / ||d||          (only if both norms are > 0)
    buf = momentum * buf + d
    p = p - lr * buf

Biases and other 1-d parameters (BatchNorm) get neither weight decay nor the trust ratio:
``d = grad``. The update runs with ``torch._foreach_*`` kernels over all parameters of a
group at once, with no host synchronisation.

torch.optim has no LARS and fastai's ``Larc`` applies weight decay outside the trust
ratio and adapts every parameter, so it is written here; fastai drives it through
``OptimWrapper`` (see :func:`lars_optimizer`), which maps its ``lr``/``mom``/``wd`` hypers.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor


class LARS(torch.optim.Optimizer):
    """LARS with momentum; see the module docstring for the update.

    Args:
        params: parameters or parameter groups.
        lr: learning rate.
        momentum: heavy-ball momentum (the paper: 0.9).
        weight_decay: L2 coefficient added to the update of >1-d parameters (paper: 1e-6).
        eta: trust coefficient (paper: 0.001).
    """

    def __init__(self, params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 0.001):
        if lr < 0:
            raise ValueError(f"lr must be >= 0, got {lr}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        if weight_decay < 0 or eta < 0:
            raise ValueError(f"weight_decay and eta must be >= 0, got {weight_decay} and {eta}")
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            updates = [p.grad.clone() for p in params]
            adapted = [i for i, p in enumerate(params) if p.ndim > 1]
            if adapted:
                p_a, d_a = [params[i] for i in adapted], [updates[i] for i in adapted]
                if group["weight_decay"]:
                    torch._foreach_add_(d_a, p_a, alpha=group["weight_decay"])
                p_norm = torch.stack(torch._foreach_norm(p_a))  # [n_adapted]
                d_norm = torch.stack(torch._foreach_norm(d_a))  # [n_adapted]
                trust = torch.where((p_norm > 0) & (d_norm > 0), group["eta"] * p_norm / d_norm, torch.ones_like(p_norm))
                torch._foreach_mul_(d_a, list(trust.unbind()))
            buffers = []
            for p, d in zip(params, updates):
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = d  # first step: buf = d
                else:
                    buffers.append((state["momentum_buffer"], d))
            if buffers:
                bufs, ds = [b for b, _ in buffers], [d for _, d in buffers]
                torch._foreach_mul_(bufs, group["momentum"])
                torch._foreach_add_(bufs, ds)
            torch._foreach_add_(params, [self.state[p]["momentum_buffer"] for p in params], alpha=-group["lr"])
        return loss


def lars_optimizer(params, lr: float, **kwargs):
    """fastai ``opt_func`` for :class:`LARS`: ``Learner(..., opt_func=lars_optimizer)``."""
    from fastai.optimizer import OptimWrapper

    return OptimWrapper(params, opt=partial(LARS, **kwargs), lr=lr)

