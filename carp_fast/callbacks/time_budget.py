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
    budget for the export and jitter. ``learn.fit(n)`` gives the most epochs; the plan is
    ``learn.planned_steps`` optimizer steps (the schedules' length, read by
    :func:`~carp_fast.callbacks.schedule.step_progress`) in ``learn.n_epoch`` epochs, the
    last one cut short. It is printed::

        plan: 1234 steps of batch 256 (5.3 epochs), 0.31 s a step: about 8.9 of 9 minutes

    A few seconds of steps are a noisy measure (on 2 CPU cores they came out 1-12 % slower
    than the epochs that followed), and they do not see what every epoch costs besides its
    steps (the loader's restart, checkpoints), nor a machine that slows down. So at the end of
    each epoch's training phase the pace since the plan (k-NN evaluations left out: they are
    reserved on their own), or that epoch's if slower, is measured again, and the plan is
    resized to the steps that fit at it (printed as ``re-plan: ...``): shortened whenever its
    steps no longer fit, lengthened when 1 % more steps (or an epoch's, if fewer) would fit. The
    schedules then move by the steps added or taken off and still end where they should.

    The plan is kept in ``learn.plan`` (the numbers) and in the checkpoint, so a resumed run
    goes on with the same schedule (a resumed run's clock starts again, so it does not
    re-plan). Every process follows the main process's plans and its stops. As a last guard,
    the fit still ends after an epoch when the next one would overrun the budget
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
        return time.time() - self._t0  # one clock (time.time) throughout: ``started`` is on it too

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
        self._planned_at = None  # (time, steps, k-NN seconds so far) when this process planned
        if plan is not None:  # the schedules go on as first planned
            self.learn.planned_steps, self.learn.n_epoch = plan["steps"], plan["epochs"]

    def after_fit(self):
        "Later fits without a plan use their own length (``learn.plan`` stays to be read)."
        self.learn.planned_steps = None

    def before_epoch(self):
        self.epoch_start, self.epoch_steps0 = time.time(), optimizer_steps(self.learn)

    def _monitor(self):
        return getattr(self.learn, "knn_monitor", None)

    def _eval_seconds(self) -> tuple[float, float]:
        "How long the k-NN monitor's last evaluation took, and all of them so far (0 without one)."
        monitor = self._monitor()
        return getattr(monitor, "seconds", 0.0), getattr(monitor, "seconds_total", 0.0)

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
                self._timer = time.time()
            elif done >= self.warmup + self.measure:
                seconds = time.time() - self._timer
                if main_process_decides(seconds >= self.measure_seconds):
                    self._plan(seconds / (done - self.warmup), steps)
        # Here, after every other callback's after_batch (this one runs last), not in
        # before_batch: a batch cancelled there would leave the precision callbacks' autocast on.
        if self.learn.planned_steps is not None and steps >= self.learn.planned_steps:
            raise CancelTrainException()

    def _accumulation(self) -> int:
        accumulation = getattr(self.learn, "gradient_accumulation", None)
        return accumulation.n_steps if accumulation is not None else 1

    def _steps_per_epoch(self) -> int:
        return max(1, self.learn.n_iter // self._accumulation())

    def _steps_that_fit(self, step_seconds: float, steps_done: int) -> int:
        """The optimizer steps (``steps_done`` included, at most those of ``fit``'s epochs) after
        which the fit ends, its k-NN evaluations included, inside the budget less its margin, at
        ``step_seconds`` a step."""
        per_epoch, monitor = self._steps_per_epoch(), self._monitor()
        eval_seconds = self._eval_seconds()[0]
        left = self.seconds * (1 - self.margin) - self._elapsed() - eval_seconds  # the last evaluation
        planned = min(self._max_epochs * per_epoch, steps_done + max(0, math.floor(left / step_seconds)))
        if monitor is not None and eval_seconds:  # and the ones due before it, from this epoch on
            last = math.ceil(planned / per_epoch) - 1
            evaluations = sum((epoch + 1) % monitor.every == 0 for epoch in range(self.learn.epoch, last))
            planned = min(planned, steps_done + max(0, math.floor((left - evaluations * eval_seconds) / step_seconds)))
        return max(main_process_value(planned), steps_done)

    def _plan(self, step_seconds: float, steps_done: int) -> None:
        """Set ``learn.planned_steps`` and ``learn.n_epoch`` from the measured step time."""
        planned = self._steps_that_fit(step_seconds, steps_done)
        self._planned_at = (time.time(), steps_done, self._eval_seconds()[1])
        self._set_plan(planned, step_seconds, steps_done, "plan")

    def _set_plan(self, planned: int, step_seconds: float, steps_done: int, word: str) -> None:
        learn, per_epoch = self.learn, self._steps_per_epoch()
        epochs = max(1, math.ceil(planned / per_epoch))
        learn.planned_steps, learn.n_epoch = planned, epochs
        total = self._elapsed() + (planned - steps_done) * step_seconds + self._eval_seconds()[0]
        learn.plan = dict(steps=planned, epochs=epochs, step_seconds=step_seconds, minutes=total / 60)
        if getattr(learn, "accelerator", None) is None or learn.accelerator.is_main_process:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            batch = find_bs(learn.xb) * self._accumulation() * world
            print(f"{word}: {planned} steps of batch {batch} ({planned / per_epoch:.1f} epochs), "
                  f"{step_seconds:.3g} s a step: about {total / 60:.1f} of {self.seconds / 60:g} minutes", flush=True)

    def after_train(self):
        """Measure the pace since the plan again (the epoch's own costs now included) and resize the
        plan to it: shorter if its steps no longer fit, longer if clearly more would."""
        if self._planned_at is None or self.learn.planned_steps is None:
            return  # no plan yet, or one restored from a checkpoint (this process's clock is newer)
        planned_time, steps0, eval_total0 = self._planned_at
        steps, now = optimizer_steps(self.learn), time.time()
        if steps >= self.learn.planned_steps or steps - steps0 < self.measure:
            return
        pace = (now - planned_time - (self._eval_seconds()[1] - eval_total0)) / (steps - steps0)
        epoch_steps = steps - self.epoch_steps0
        if self.epoch_start >= planned_time and epoch_steps > 0:
            # An epoch begun after the plan: its pace too, if slower (a machine that slows down).
            pace = max(pace, (now - self.epoch_start) / epoch_steps)
        planned = self._steps_that_fit(pace, steps)
        current = self.learn.planned_steps
        if planned < current or planned >= current + max(1, min(self._steps_per_epoch(), math.ceil(0.01 * current))):
            self._set_plan(planned, pace, steps, "re-plan")

    # ---- guard ------------------------------------------------------------------------------

    def after_epoch(self):
        "End after the planned epochs; stop if the next epoch would overrun (a guard)."
        learn = self.learn
        if learn.plan is not None and learn.epoch >= learn.n_epoch - 1:
            raise CancelFitException()  # fastai's own Learner loops over the n_epoch of its start
        seconds = time.time() - self.epoch_start
        self.longest = max(self.longest, seconds)
        next_epoch = self.longest  # without a plan: as long as the longest so far
        steps = optimizer_steps(learn)
        epoch_steps = steps - self.epoch_steps0
        if learn.planned_steps is not None and epoch_steps > 0:  # the steps left in it at this epoch's pace
            next_epoch = min(epoch_steps, learn.planned_steps - steps) * seconds / epoch_steps
        overrun = learn.epoch < learn.n_epoch - 1 and self._elapsed() + next_epoch > self.seconds
        if main_process_decides(overrun):
            learn.stopped_early = True
            raise CancelFitException()
