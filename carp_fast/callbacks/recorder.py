"""fastai's Recorder without a host synchronisation on every batch."""

from __future__ import annotations

import torch
from fastai.learner import Recorder


class DeviceRecorder(Recorder):
    """A drop-in :class:`fastai.learner.Recorder` that keeps training losses on the device.

    fastai's Recorder moves every batch's loss to the CPU (``to_detach``), which blocks the
    host until the GPU has finished the step. Here the smoothed loss stays a device tensor
    and the per-batch values reach the host once per epoch; ``recorder.losses`` and
    ``plot_loss()`` work as before after each epoch.
    """

    name = "recorder"  # stays `learn.recorder`, where fastai and users look for it

    def after_batch(self):
        "Smooth the training loss on the device; validation batches as in fastai."
        if len(self.yb) == 0:
            return
        if not self.training:
            return super().after_batch()
        smooth = self.smooth_loss
        loss = self.learn.loss.detach().float().mean()
        smooth.count += 1
        smooth.val = torch.lerp(loss, smooth.val.to(loss.device), smooth.beta)
        self.lrs.append(self.opt.hypers[-1]["lr"])
        self.losses.append(smooth.value)
        self.learn.smooth_loss = smooth.value

    def after_train(self):
        "Bring the epoch's losses to the host in one transfer."
        pending = [i for i, x in enumerate(self.losses) if isinstance(x, torch.Tensor)]
        if pending:
            values = torch.stack([self.losses[i] for i in pending]).tolist()
            for i, v in zip(pending, values):
                self.losses[i] = torch.tensor(v)
        super().after_train()
