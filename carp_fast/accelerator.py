"""Accelerate for processes and devices, with carp_fast's precision as the only precision.

``accelerate launch`` hands the mixed precision of ``accelerate config`` (or
``--mixed_precision``) to the script in ``ACCELERATE_MIXED_PRECISION``, and an ``Accelerator``
built from it autocasts the model's forward in ``prepare_model``, on top of the precision
callbacks that :class:`~carp_fast.method.MethodConfig` ``precision`` adds (the loss would run
under two autocasts, fp16 without its GradScaler). Here Accelerate's setting is adopted
where ``precision`` is "auto", refused where it disagrees, and Accelerate itself runs "no".
"""

from __future__ import annotations

import os

import torch

ACCELERATE_PRECISIONS = {"no": None, "bf16": "bf16", "fp16": "fp16"}


def configured_precision() -> str:
    """The mixed precision ``accelerate launch`` passed on ("no" when run without it)."""
    return os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower() or "no"


def adopt_accelerate_precision(precision: str) -> str:
    """``precision`` (a MethodConfig value) reconciled with Accelerate's configured one.

    Returns ``precision`` itself, or Accelerate's bf16 / fp16 where ``precision`` is
    "auto". Raises ValueError when the two disagree or Accelerate asks for one carp_fast
    does not run (fp8).
    """
    configured = configured_precision()
    if configured not in ACCELERATE_PRECISIONS:
        raise ValueError(
            f"accelerate is configured with mixed precision {configured!r}, which carp_fast does not run; "
            "launch with --mixed_precision no and choose --precision fp32, bf16 or fp16"
        )
    wanted = ACCELERATE_PRECISIONS[configured]
    if wanted is None or wanted == precision:
        return precision
    if precision == "auto":
        return wanted
    raise ValueError(
        f"accelerate is configured with mixed precision {configured!r} but --precision is {precision!r}; "
        "carp_fast applies one precision: make them agree, or launch with --mixed_precision no"
    )


def make_accelerator(cpu: bool | None = None, **kwargs):
    """An ``Accelerator`` that applies no precision of its own (carp_fast's callbacks do), on
    the CPU when ``cpu`` (None: when there is no CUDA); ``kwargs`` go to ``Accelerator``.

    On CUDA it turns ``torch.backends.cudnn.benchmark`` on: training crops have fixed shapes
    (:func:`carp_fast.device.cudnn_benchmark_for`).
    """
    from accelerate import Accelerator

    from .device import cudnn_benchmark_for

    if cpu is None:
        cpu = not torch.cuda.is_available()
    accelerator = Accelerator(cpu=cpu, mixed_precision="no", **kwargs)
    if cudnn_benchmark_for(accelerator.device):
        torch.backends.cudnn.benchmark = True
    return accelerator


def check_accelerator(accelerator) -> None:
    """Refuse an Accelerator that would autocast the model on top of carp_fast's precision."""
    if getattr(accelerator, "mixed_precision", "no") != "no":
        raise ValueError(
            f"the Accelerator has mixed_precision={accelerator.mixed_precision!r}; carp_fast applies its own "
            "precision (the method config's precision): build it with mixed_precision='no' "
            "(carp_fast.accelerator.make_accelerator) and set the precision in the config"
        )
