"""Mixed precision by autocast, on CPU as well as on CUDA.

fastai's ``MixedPrecision`` and ``to_bf16()`` only autocast on CUDA (on the CPU they
silently train in float32), so bfloat16 runs through this thin callback instead. float16
on CUDA needs a gradient scaler: :func:`precision_callbacks` hands that case to fastai's
own ``MixedPrecision``.
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

PRECISIONS = ("fp32", "bf16", "fp16")


class Autocast(Callback):
    """Runs the forward pass and the loss under ``torch.autocast(device, dtype)``.

    The backward pass runs outside autocast, as PyTorch recommends; the device type is
    read from the model's parameters at the start of the fit.
    """

    order, run_valid = 10, True

    def __init__(self, dtype: torch.dtype = torch.bfloat16):
        self.dtype, self._context = dtype, None

    def before_fit(self):
        "Pick the device type from the model."
        self.device_type = next(self.learn.model.parameters()).device.type

    def before_batch(self):
        "Enter autocast."
        self._context = torch.autocast(self.device_type, dtype=self.dtype)
        self._context.__enter__()

    def after_loss(self):
        "Leave autocast before the backward pass."
        self._leave()

    def after_cancel_batch(self):
        "Leave autocast if the batch was cancelled inside it."
        self._leave()

    def _leave(self):
        if self._context is not None:
            self._context.__exit__(None, None, None)
            self._context = None


def precision_callbacks(precision: str, device: torch.device) -> list[Callback]:
    """Callbacks for ``precision`` in ``PRECISIONS`` on ``device``."""
    if precision == "fp32":
        return []
    if precision == "bf16":
        return [Autocast(torch.bfloat16)]
    if precision == "fp16":
        if device.type != "cuda":
            raise ValueError(f"precision='fp16' needs a CUDA device (got {device}); use 'bf16' or 'fp32'")
        from fastai.callback.fp16 import MixedPrecision

        return [MixedPrecision()]
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
