"""Plans a fit to a time budget: the schedules are sized to what this machine can do in it."""

from __future__ import annotations

import math
import time

import torch.distributed
from fastai.callback.core import Callback, CancelFitException, CancelTrainException
from fastai.torch_core import find_bs

from ..distributed import main_process_decides, main_process_value
from .accumulation import optimizer_steps
from .checkpointer import Checkpointer
from .stand_aside import stands_aside


class TimeBudget(Callback):
    """Sizes the fit so that it ends, its last evaluation included, within ``minutes``.

    A schedule cut by a clock ends before its learning rate and teacher momentum reach their
    ends, and a slower machine gets a shorter, worse run. So the budget is planned instead:
    after ``warmup`` optimizer steps the next ones are timed (at least ``measure`` steps and
    ``measure_seconds``), and the main process sets the fit's length to the steps that fit in
    what is left of the budget, less a reserve for the end: the k-NN evaluation as long as
    the last one the :class:`~carp_fast.callbacks.KNNMonitor` took (the one at
    initialisation, say), the monitor's evaluations due before it, and ``margin`` of the
    budget for the per-epoch checkpoints and loader restarts, the export and jitter (a fit of
    many epochs of a few seconds outgrows 3 %: the guard below then ends it early). ``learn.fit(n)`` gives the most epochs;
    the plan is ``learn.planned_steps`` optimizer steps (the schedules' length, read by
    :func:`~carp_fast.callbacks.schedule.step_progress`) in ``learn.n_epoch`` epochs, the
    last one cut short. It is printed::

        plan: 1234 steps of batch 256 (5.3 epochs), 0.31 s a step: about 8.9 of 9 minutes

    and kept in ``learn.plan`` (the numbers) and in the checkpoint, so a resumed run goes on
    with the same schedule. Every process follows the main process's plan and its stops. As
    a guard, the fit still ends after an epoch when the next one would overrun the budget
    (``learn.stopped_early`` then says so).

    Args:
        minutes: the whole budget.
        started: ``time.time()`` at the start of the budget; None: when the fit starts. A
            recipe passes its process's start, so that start-up and the evaluation of the
            network at initialisation count too.
        margin: the share of the budget kept free besides the final evaluation.
    """

    order, run_valid = Checkpointer.order + 1, False  # the last callback: after_batch may end the epoch

    def __init__(self, minutes: float, started: float | None = None, margin: float = 0.03, warmup: int = 2,
                 measure: int = 5, measure_seconds: float = 3.0):
        if minutes <= 0:
            raise ValueError(f"minutes must be > 0, got {minutes}")
        if warmup < 1 or measure < 1:
            raise ValueError(f"warmup and measure must be >= 1 step, got {warmup} and {measure}")
        if not 0 <= margin < 1:
            raise ValueError(f"margin must be in [0, 1), got {margin}")
        self.seconds, self.started, self.margin = 60.0 * minutes, started, margin
        self.warmup, self.measure, self.measure_seconds = warmup, measure, measure_seconds

    # ---- clock ------------------------------------------------------------------------------

    def _elapsed(self) -> float:
        return time.time() - self._t0

    def before_fit(self):
        "Start the clock; a resumed run (a Checkpointer restored its counters) keeps its plan."
        self.run = not stands_aside(self.learn)
        if not self.run:
            return
        self._t0 = self.started if self.started is not None else time.time()
        self.longest, self.learn.stopped_early, self._timer = 0.0, False, None
        self._fit_steps0, self._max_epochs = optimizer_steps(self.learn), self.learn.n_epoch
        plan = getattr(self.learn, "plan", None) if self.learn.train_iter > 0 else None
        self.learn.plan, self.learn.planned_steps = plan, None
        if plan is not None:  # the schedules go on as first planned
            self.learn.planned_steps, self.learn.n_epoch = plan["steps"], plan["epochs"]

    def after_fit(self):
        "Later fits without a plan use their own length (``learn.plan`` stays to be read)."
        self.learn.planned_steps = None

    def before_epoch(self):
        self.epoch_start, self.epoch_steps0 = time.time(), optimizer_steps(self.learn)

    # ---- plan -------------------------------------------------------------------------------

    def after_batch(self):
        """Time the steps after the warm-up, then plan (at the same step on every process); end the
        training phase once the planned optimizer steps are done."""
        if self.learn.train_iter % self._accumulation():
            return  # inside an optimizer step
        steps = optimizer_steps(self.learn)
        if self.learn.plan is None:
            done = steps - self._fit_steps0
            if done == self.warmup:
                self._timer = time.perf_counter()
            elif done >= self.warmup + self.measure:
                seconds = time.perf_counter() - self._timer
                if main_process_decides(seconds >= self.measure_seconds):
                    self._plan(seconds / (done - self.warmup), steps)
        # Here, after every other callback's after_batch (this one runs last), not in
        # before_batch: a batch cancelled there would leave the precision callbacks' autocast on.
        if self.learn.planned_steps is not None and steps >= self.learn.planned_steps:
            raise CancelTrainException()

    def _accumulation(self) -> int:
        accumulation = getattr(self.learn, "gradient_accumulation", None)
        return accumulation.n_steps if accumulation is not None else 1

    def _plan(self, step_seconds: float, steps_done: int) -> None:
        """Set ``learn.planned_steps`` and ``learn.n_epoch`` from the measured step time."""
        learn = self.learn
        steps_per_epoch = max(1, learn.n_iter // self._accumulation())
        most = self._max_epochs * steps_per_epoch
        monitor = getattr(learn, "knn_monitor", None)
        eval_seconds = getattr(monitor, "seconds", 0.0) if monitor is not None else 0.0
        left = self.seconds * (1 - self.margin) - self._elapsed() - eval_seconds
        planned = min(most, steps_done + max(0, math.floor(left / step_seconds)))
        if monitor is not None and eval_seconds:  # the monitor's evaluations before the last one
            evaluations = (math.ceil(planned / steps_per_epoch) - 1) // monitor.every
            planned = min(planned, steps_done + max(0, math.floor((left - evaluations * eval_seconds) / step_seconds)))
        planned = max(main_process_value(planned), steps_done)
        epochs = max(1, math.ceil(planned / steps_per_epoch))
        learn.planned_steps, learn.n_epoch = planned, epochs
        total = self._elapsed() + (planned - steps_done) * step_seconds + eval_seconds
        learn.plan = dict(steps=planned, epochs=epochs, step_seconds=step_seconds, minutes=total / 60)
        if getattr(learn, "accelerator", None) is None or learn.accelerator.is_main_process:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            batch = find_bs(learn.xb) * self._accumulation() * world
            print(f"plan: {planned} steps of batch {batch} ({planned / steps_per_epoch:.1f} epochs), "
                  f"{step_seconds:.3g} s a step: about {total / 60:.1f} of {self.seconds / 60:g} minutes", flush=True)

    # ---- guard ------------------------------------------------------------------------------

    def after_epoch(self):
        "End after the planned epochs; stop if the next epoch would overrun (a guard)."
        learn = self.learn
        if learn.plan is not None and learn.epoch >= learn.n_epoch - 1:
            raise CancelFitException()  # fastai's own Learner loops over the n_epoch of its start
        seconds = time.time() - self.epoch_start
        self.longest = max(self.longest, seconds)
        next_epoch = self.longest  # without a plan: as long as the longest so far
        steps, epoch_steps = optimizer_steps(learn), optimizer_steps(learn) - self.epoch_steps0
        if learn.planned_steps is not None and epoch_steps > 0:  # the steps left in it at this epoch's pace
            next_epoch = min(epoch_steps, learn.planned_steps - steps) * seconds / epoch_steps
        overrun = learn.epoch < learn.n_epoch - 1 and self._elapsed() + next_epoch > self.seconds
        if main_process_decides(overrun):
            learn.stopped_early = True
            raise CancelFitException()
