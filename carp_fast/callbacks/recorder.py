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

    The per-batch history is bounded: ``losses`` and ``lrs`` keep the newest ``window``
    entries after each epoch (never more than 2 x ``window``), ``dropped`` counts those cut
    from the front, and the per-epoch summaries (``values``, ``iters``) stay whole, so the
    host memory does not grow with the steps (a million micro-batches over 200 epochs).
    """

    name = "recorder"  # stays `learn.recorder`, where fastai and users look for it
    window = 10_000  # per-batch losses and lrs kept: the newest `window` to 2 x `window`

    def before_fit(self):
        super().before_fit()
        self.dropped = 0  # per-batch entries dropped from the front of `losses` and `lrs`

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
        if len(self.losses) >= 2 * self.window:  # one transfer per `window` batches at most
            self._to_host()

    def after_train(self):
        "Bring the epoch's losses to the host in one transfer."
        self._to_host()
        super().after_train()

    def _to_host(self):
        """Device losses to host floats in one transfer, and the per-batch history cut to its
        newest ``window`` entries: the host memory does not grow with the steps (the per-epoch
        summaries in ``values`` stay whole)."""
        pending = [i for i, x in enumerate(self.losses) if isinstance(x, torch.Tensor) and x.device.type != "cpu"]
        if pending:
            values = torch.stack([self.losses[i] for i in pending]).tolist()
            for i, v in zip(pending, values):
                self.losses[i] = torch.tensor(v)
        extra = len(self.losses) - self.window
        if extra > 0:
            del self.losses[:extra]
            del self.lrs[: max(0, len(self.lrs) - self.window)]
            self.dropped = getattr(self, "dropped", 0) + extra

    def plot_loss(self, skip_start=5, with_valid=True, log=False, show_epochs=False, ax=None):
        "fastai's plot, with the kept training losses at their true step numbers."
        if not getattr(self, "dropped", 0):
            return super().plot_loss(skip_start, with_valid, log, show_epochs, ax)
        import matplotlib.pyplot as plt
        import numpy as np

        ax = plt.subplots()[1] if ax is None else ax
        x = list(range(self.dropped, self.dropped + len(self.losses)))
        (ax.loglog if log else ax.plot)(x, [float(v) for v in self.losses], label="train")
        if with_valid and self.values and "valid_loss" in self.metric_names:
            idx = int((np.array(self.iters) < self.dropped).sum())
            valid_col = self.metric_names.index("valid_loss") - 1
            ax.plot(self.iters[idx:], [v[valid_col] for v in self.values[idx:]], label="valid")
            ax.legend()
        return ax
