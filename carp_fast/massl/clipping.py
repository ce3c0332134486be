"""Per-parameter gradient clipping, as MaSSL's (and DINO's) official code clips."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision


@torch.no_grad()
def clip_per_parameter(grads: list[torch.Tensor], max_norm: float) -> None:
    """Scale each gradient whose own L2 norm exceeds ``max_norm`` down to it, in place.

    ``g <- g * min(1, max_norm / (|g| + 1e-6))`` for every tensor separately (official
    ``utils.clip_gradients``), not one global norm as ``torch.nn.utils.clip_grad_norm_``:
    a large gradient of one layer does not shrink every other layer's step. Fused
    (``torch._foreach_*``) and without the official code's host sync per parameter.
    """
    if not grads:
        return
    norms = torch.stack(torch._foreach_norm(grads))  # [n_params]
    scales = (max_norm / (norms + 1e-6)).clamp(max=1.0)  # [n_params]
    torch._foreach_mul_(grads, scales.unbind())


class ClipGradPerParameter(Callback):
    """Clips each trainable parameter's gradient to norm ``max_norm`` before the step.

    Runs after fastai's MixedPrecision (which unscales fp16 gradients) and after
    :class:`~carp_fast.callbacks.GradientAccumulation` has let the step through, so it clips
    the accumulated, all-reduced gradient: the same on every rank.

    Args:
        max_norm: the largest L2 norm of one parameter's gradient (MaSSL: 3).
    """

    order, run_valid = MixedPrecision.order + 1, False

    def __init__(self, max_norm: float = 3.0):
        if max_norm <= 0:
            raise ValueError(f"max_norm must be > 0, got {max_norm}")
        self.max_norm = max_norm

    def before_step(self):
        "Clip."
        clip_per_parameter([p.grad for p in self.learn.model.parameters() if p.grad is not None], self.max_norm)
