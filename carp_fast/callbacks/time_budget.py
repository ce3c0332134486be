"""Stops a fit before the next epoch would overrun a time budget."""

from __future__ import annotations

import time

from fastai.callback.core import Callback, CancelFitException

from ..distributed import main_process_decides
from .checkpointer import Checkpointer
from .stand_aside import stands_aside


class TimeBudget(Callback):
    """Ends the fit after an epoch when the next one would not finish within ``minutes``.

    The decision uses the longest epoch so far, as the main process measured it (its epochs
    include the k-NN monitor and the checkpoint), and every process follows it: ranks that
    decided alone could part ways, one stopping while another waits in the next epoch's
    collectives. The learning-rate and momentum schedules still assume the full number of
    epochs, so a run cut short ends before their ends; ``learn.stopped_early`` records that
    it happened.
    """

    order, run_valid = Checkpointer.order + 1, False

    def __init__(self, minutes: float):
        if minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        self.seconds = 60.0 * minutes

    def before_fit(self):
        "Start the clock."
        self.start, self.longest, self.learn.stopped_early = time.perf_counter(), 0.0, False
        self.run = not stands_aside(self.learn)

    def before_epoch(self):
        self.epoch_start = time.perf_counter()

    def after_epoch(self):
        "Stop if another epoch would overrun."
        now = time.perf_counter()
        self.longest = max(self.longest, now - self.epoch_start)
        overrun = self.learn.epoch < self.learn.n_epoch - 1 and now - self.start + self.longest > self.seconds
        if main_process_decides(overrun):
            self.learn.stopped_early = True
            raise CancelFitException()
