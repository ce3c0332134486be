"""The loss history's host memory does not grow with the steps (issue 21, deliverable 4)."""

import matplotlib

matplotlib.use("Agg")
import torch

from carp_fast.callbacks.recorder import DeviceRecorder
from carp_fast.carp import carp_learner


def test_per_batch_history_is_bounded_over_epochs_and_inside_one(tiny_dls, tiny_config, monkeypatch):
    monkeypatch.setattr(DeviceRecorder, "window", 2)
    learn = carp_learner(tiny_dls, tiny_config, progress=False)
    batches = len(tiny_dls.train)
    assert batches >= 4, "the test needs more batches per epoch than 2 x window"
    lengths = []
    learn.add_cb(type("Watch", (__import__("fastai").callback.core.Callback,), {
        "order": 100, "after_batch": lambda self: lengths.append(len(self.learn.recorder.losses))})())
    learn.fit(3)
    rec = learn.recorder
    assert max(lengths) <= 2 * rec.window  # bounded inside an epoch too, not only at its end
    assert len(rec.losses) == len(rec.lrs) == rec.window
    assert rec.dropped + len(rec.losses) == 3 * batches  # every step counted, the newest kept
    assert all(isinstance(v, torch.Tensor) and v.device.type == "cpu" for v in rec.losses)
    assert float(rec.losses[-1]) == float(learn.smooth_loss)
    assert len(rec.values) == 3  # the per-epoch summaries stay whole
    rec.plot_loss()  # fastai's plot still works on the cut history

