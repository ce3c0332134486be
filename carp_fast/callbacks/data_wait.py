"""How much of training waits for the input pipeline: data-bound or compute-bound."""

from __future__ import annotations

import time

from fastai.callback.core import Callback, TrainEvalCallback


class _TimedIterator:
    """Wraps a training loader; adds the seconds spent inside its ``__next__`` to ``owner.waited``."""

    def __init__(self, loader, owner: "DataWait"):
        self._loader, self._owner = loader, owner

    def __len__(self):
        return len(self._loader)

    def __getattr__(self, name):  # fastai reads attributes of the loader (device, bs, ...)
        return getattr(self._loader, name)

    def __iter__(self):
        iterator = iter(self._loader)
        while True:
            start = time.perf_counter()
            try:
                batch = next(iterator)
            except StopIteration:
                return
            self._owner.waited += time.perf_counter() - start
            yield batch


class DataWait(Callback):
    """Measures the share of training time spent waiting for the next batch.

    The training loader is wrapped for the epoch, so exactly the time the training loop is
    blocked in the loader's ``__next__`` counts (decoding, augmentation and transfers that
    are not done ahead of the step). After each epoch ``learn.data_wait`` holds that
    epoch's share (0: compute-bound, 1: all waiting); while it runs, ``learn.data_wait_now``
    holds the share so far. Works in any fastai Learner. On a GPU the host runs ahead of the
    device, so a step's time is the host's, which waits on the device at its syncs.
    """

    order, run_valid = TrainEvalCallback.order - 10, False  # wrap the loader before anything else runs

    def before_train(self):
        "Wrap the epoch's loader and start the clock."
        self.waited, self._start = 0.0, time.perf_counter()
        self.learn.dl = _TimedIterator(self.learn.dl, self)

    def after_batch(self):
        "Keep the share so far, for progress displays."
        self.learn.data_wait_now = self.waited / max(time.perf_counter() - self._start, 1e-9)

    def after_train(self):
        "The epoch's share; unwrap the loader."
        self.learn.data_wait = self.waited / max(time.perf_counter() - self._start, 1e-9)
        self.learn.data_wait_seconds = self.waited
        if isinstance(self.learn.dl, _TimedIterator):
            self.learn.dl = self.learn.dl._loader
