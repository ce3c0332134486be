"""Inputs in the channels_last memory format, to match a channels_last model."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback

from .accumulation import GradientAccumulation


class ChannelsLastInputs(Callback):
    """Converts every 4-d input ``[N, C, H, W]`` of a batch to channels_last before the forward.

    A model converted with ``model.to(memory_format=torch.channels_last)`` computes in that
    layout only when its inputs are in it too (otherwise every convolution converts). Works
    in any Learner.
    """

    order = GradientAccumulation.order + 1  # early in before_batch, before the precision callbacks

    def before_batch(self):
        "Convert the inputs."
        self.learn.xb = tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in self.learn.xb)
