"""A rich progress display for the main process."""

from __future__ import annotations

import sys
import time

from fastai.callback.core import Callback
from fastai.learner import Recorder

from .accumulation import optimizer_steps


class RichProgress(Callback):
    """Epoch, step, images/s, ETA and the latest logged loss, entropy and momentum.

    Shows a rich progress bar on a terminal; elsewhere (a cluster job's redirected stdout,
    CI logs) prints a concise line every ``print_every_s`` seconds within an epoch (an
    ImageNet epoch is tens of minutes) and one at the end of each epoch. Numbers come from ``learn.carp_log`` (written by
    :class:`~carp_fast.callbacks.carp_stats.CARPStats` once per logging interval), so the
    display adds no host synchronisation. Only the main process displays anything.

    Args:
        images_per_batch: images of one training batch over all processes (for images/s).
        live: force the bar on (True) or off (False); default: on when stdout is a terminal.
        show: False prints nothing (``learn.images_per_s`` is still measured).
        print_every_s: without a bar, seconds between progress lines within an epoch.
    """

    order, run_valid = Recorder.order + 15, False  # after the Recorder and the statistics it displays

    def __init__(self, images_per_batch: int, live: bool | None = None, show: bool = True, print_every_s: float = 120.0):
        self.images_per_batch, self.live, self.show, self.print_every_s = images_per_batch, live, show, print_every_s

    def before_fit(self):
        "Start the bar (main process only)."
        from accelerate.state import PartialState

        self.enabled = self.show and PartialState().is_main_process
        self.live_now = sys.stdout.isatty() if self.live is None else self.live
        self._progress = None
        if self.enabled and self.live_now:
            from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

            self._progress = Progress(
                TextColumn("epoch {task.fields[epoch]}"), BarColumn(), TextColumn("batch {task.completed}/{task.total}"),
                TextColumn("{task.fields[speed]}"), TimeRemainingColumn(), TextColumn("{task.fields[stats]}"),
            )
            total = len(self.learn.dls.train) * self.learn.n_epoch
            self._task = self._progress.add_task("fit", total=total, epoch=0, speed="", stats="")
            self._progress.start()
        self._start = time.perf_counter()

    def before_train(self):
        "Time the epoch."
        self._epoch_start, self._epoch_step0 = time.perf_counter(), self.learn.train_iter
        self._last_line = self._epoch_start

    def after_batch(self):
        "Advance the bar, or print a line when ``print_every_s`` has passed without one."
        if not self.enabled:
            return
        now = time.perf_counter()
        steps = self.learn.train_iter - self._epoch_step0
        speed = steps * self.images_per_batch / max(now - self._epoch_start, 1e-9)
        if self._progress is None:
            if now - self._last_line >= self.print_every_s and self.iter + 1 < self.n_iter:
                left = (self.n_iter - self.iter - 1) * (now - self._epoch_start) / max(steps, 1)
                print(f"epoch {self.learn.epoch + 1}/{self.learn.n_epoch}  batch {self.iter + 1}/{self.n_iter}  "
                      f"{speed:,.0f} img/s  {self._data_wait('data_wait_now')}epoch ends in {left / 60:.1f} min  {self._stats()}", flush=True)
                self._last_line = now
            return
        self._progress.update(self._task, completed=self.learn.train_iter, epoch=self.learn.epoch, speed=f"{speed:,.0f} img/s", stats=self._data_wait("data_wait_now") + self._stats())

    def after_train(self):
        "Keep the epoch's speed; print a line when no bar is shown."
        seconds = time.perf_counter() - self._epoch_start
        steps = self.learn.train_iter - self._epoch_step0
        self.learn.images_per_s = steps * self.images_per_batch / max(seconds, 1e-9)
        if self.enabled and self._progress is None:
            print(f"epoch {self.learn.epoch + 1}/{self.learn.n_epoch}  step {optimizer_steps(self.learn)}  "
                  f"{self.learn.images_per_s:,.0f} img/s  {self._data_wait('data_wait')}{seconds:.0f}s  {self._stats()}", flush=True)

    def after_fit(self):
        "Close the bar."
        if self._progress is not None:
            self._progress.stop()

    def _data_wait(self, attr: str) -> str:
        "The share of time spent waiting for batches (:class:`DataWait`), if measured."
        share = getattr(self.learn, attr, None)
        return "" if share is None else f"data wait {100 * share:.0f}%  "

    def _stats(self) -> str:
        log = getattr(self.learn, "carp_log", None)
        if not log:
            return ""
        shown = {"loss": ".4f", "entropy": ".4f", "teacher_temperature": ".4f", "momentum": ".5f"}
        return "  ".join(f"{k.replace('teacher_', 'tau_')} {log[k]:{fmt}}" for k, fmt in shown.items() if k in log)
