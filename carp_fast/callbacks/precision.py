"""Mixed precision by autocast, on CPU as well as on CUDA.

fastai's ``MixedPrecision`` and ``to_bf16()`` only autocast on CUDA (on the CPU they
silently train in float32), so bfloat16 runs through this thin callback instead. float16
needs a gradient scaler: :class:`FP16MixedPrecision` is fastai's ``MixedPrecision`` on the
model's device (CUDA or CPU).
"""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import AMPMode, MixedPrecision
from fastcore.foundation import L

PRECISIONS = ("fp32", "bf16", "fp16")


class Autocast(Callback):
    """Runs the forward pass and the loss under ``torch.autocast(device, dtype)``.

    The backward pass runs outside autocast, as PyTorch recommends; the device type is
    read from the model's parameters at the start of the fit.
    """

    order, run_valid = MixedPrecision.order, True  # where fastai's own mixed precision runs

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


class FP16MixedPrecision(MixedPrecision):
    """fastai's float16 ``MixedPrecision`` (autocast + ``GradScaler``) on any device.

    fastai hardcodes ``autocast("cuda")`` and ``GradScaler("cuda")``, but torch runs both on
    the CPU too, so only the device changes here. The scaler is made once and kept across
    fits (fastai makes a new one in ``before_fit``), so the
    :class:`~carp_fast.callbacks.Checkpointer` saves it and restores it into a resumed fit.
    """

    name = "mixed_precision"  # where fastai's own would be: ``learn.mixed_precision``

    def __init__(self, device_type: str):
        super().__init__(AMPMode.FP16)
        self.device_type, self.grad_scaler = device_type, torch.amp.GradScaler(device_type)

    def before_fit(self):
        "Autocast on the model's device, with the scaler that survives fits and resumes."
        self.autocast = torch.autocast(self.device_type, dtype=torch.float16)
        self.learn.scaler, self.scales = self.grad_scaler, L()


def auto_precision(device: torch.device) -> str:
    """The precision ``"auto"`` stands for on ``device``: bf16 on CUDA; on the CPU bf16 only
    where oneDNN has bf16 kernels (AVX512-BF16 or AMX), fp32 elsewhere.

    On this project's AVX512-BF16 CPUs bf16 autocast with channels_last trains the embedded
    default at 2.7x the images/s of fp32 (BENCHMARKS.md); without bf16 units it is slower.
    """
    if device.type == "cuda":
        return "bf16"
    return "bf16" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


def auto_channels_last(device: torch.device, precision: str) -> bool:
    """channels_last by default where it pays: on CUDA, and on the CPU where oneDNN runs the
    convolutions, in bf16 and in fp32 alike (the Learner's fp32 step: 1.20x with AVX-512,
    1.18x with oneDNN held to AVX2; BENCHMARKS.md)."""
    return device.type == "cuda" or precision == "bf16" or (device.type == "cpu" and torch.backends.mkldnn.is_available())


def precision_callbacks(precision: str, device: torch.device) -> list[Callback]:
    """Callbacks for ``precision`` in ``PRECISIONS`` on ``device``."""
    if precision == "fp32":
        return []
    if precision == "bf16":
        return [Autocast(torch.bfloat16)]
    if precision == "fp16":
        return [FP16MixedPrecision(device.type)]
    raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
