"""TimeBudget: the fit sized to a time budget, so that its schedules complete inside it.

A schedule cut by a clock ends before its learning rate and teacher momentum reach their ends,
and a slower machine gets a shorter, worse run; so the budget is planned instead. The
arithmetic is :mod:`carp_fast.budget` (pure functions); this callback measures and applies it:

- plan: after ``warmup`` optimizer steps the next ones are timed (at least ``measure`` steps
  and ``measure_seconds``) and the fit is sized to the steps that fit, less a reserve for the
  end (the final k-NN evaluation as long as the monitor's last one, the evaluations due
  before it, and ``margin`` of the budget);
- re-plan: a few seconds of steps are a noisy measure (on 2 CPU cores the epochs that followed
  were 1-12 % slower) that misses each epoch's own costs (the loader's restart, checkpoints)
  and a machine that slows down; so after each epoch's training the pace since the plan (k-NN
  evaluations left out: they are reserved on their own), or that epoch's if slower, is
  measured again and the steps not yet taken are resized to it;
- guard: the fit still ends after an epoch when the next one would overrun the whole budget.

The main process prints each plan; every process follows its plans and its stops::

    plan: 1234 steps of batch 256 (5.3 epochs), 0.31 s a step: about 8.9 of 9 minutes
    re-plan: 1250 steps of batch 256 (5.4 epochs), 0.3 s a step: about 8.9 of 9 minutes

A resumed run goes on with the checkpoint's plan and does not re-plan (its clock is newer).

A budget too small for one epoch (a plan shorter than an epoch, or one already over the budget;
or a first epoch that ends, unplanned, past the budget) is warned about once, in one line on
stderr: the run still takes the steps it must (see :mod:`carp_fast.budget`), over its budget::

    warning: --minutes 0.01 is too small for one epoch here: an epoch is 469 steps at 0.31 s a step (2.4 minutes); the run takes 8 steps, about 0.1 minutes in all

What it sets on the Learner:

=======================  ==============================================  =============================================
attribute                set by                                          read by
=======================  ==============================================  =============================================
``learn.plan``           TimeBudget (a :class:`~carp_fast.budget.Plan`   TimeBudget.before_fit (a resume goes on with
                         as a dict: steps, epochs, step_seconds,         it), checkpoint.save_checkpoint, run.finish
                         minutes); checkpoint.restore_checkpoint         (the summary)
``learn.planned_steps``  TimeBudget (the plan's steps; None outside      schedule.schedule_length (the schedules'
                         its fits)                                       length), TimeBudget.after_batch (the end)
``learn.n_epoch``        ``learn.fit(n)`` (the most), then TimeBudget    PretrainLearner._do_fit (re-read each epoch),
                         (the plan's epochs)                             KNNMonitor and Checkpointer (the last epoch)
``learn.stopped_early``  TimeBudget (True: the guard ended the fit)      run.finish (the summary)
=======================  ==============================================  =============================================
"""

from __future__ import annotations

import sys
import time

import torch.distributed
from fastai.callback.core import Callback, CancelFitException, CancelTrainException
from fastai.torch_core import find_bs

from ..budget import Plan, replan, steps_that_fit
from ..distributed import main_process_decides, main_process_value
from .accumulation import optimizer_steps
from .checkpointer import Checkpointer
from .stand_aside import stands_aside


class TimeBudget(Callback):
    """Sizes the fit so that it ends, its final k-NN evaluation included, within ``minutes``
    (the module says how, and what it sets on the Learner). ``learn.fit(n)`` gives the most epochs.

    Args:
        minutes: the whole budget.
        started: ``time.time()`` at the budget's start; None: when the fit starts. A recipe passes
            its process's start, so start-up and the evaluation at initialisation count too.
        margin: the share of the budget kept free besides the final evaluation (export, jitter).
        warmup: optimizer steps left untimed before the measure.
        measure, measure_seconds: the fewest optimizer steps and seconds timed before the plan.
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

    def before_fit(self):
        "Start the clock; a resumed run (a Checkpointer restored its counters) keeps its plan."
        self.run = not stands_aside(self.learn)
        if not self.run:
            return
        learn = self.learn
        self._t0 = self.started if self.started is not None else time.time()  # one clock, time.time, throughout
        self.longest, learn.stopped_early, self._timer, self._warned = 0.0, False, None, False
        self._fit_steps0, self._max_epochs = optimizer_steps(learn), learn.n_epoch
        plan = getattr(learn, "plan", None) if learn.train_iter > 0 else None
        learn.plan, learn.planned_steps = plan, None
        self._planned_at = None  # (time, steps, k-NN seconds so far) when this process planned
        if plan is not None:  # the schedules go on as first planned
            learn.planned_steps, learn.n_epoch = plan["steps"], plan["epochs"]

    def after_fit(self):
        "Later fits without a plan use their own length (``learn.plan`` stays to be read)."
        self.learn.planned_steps = None

    def before_epoch(self):
        self.epoch_start, self.epoch_steps0 = time.time(), optimizer_steps(self.learn)

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
                    step_seconds, elapsed = seconds / (done - self.warmup), self._elapsed()
                    self._planned_at = (time.time(), steps, self._eval_seconds()[1])
                    planned = self._steps_that_fit(step_seconds, steps, elapsed)
                    self._apply(planned, step_seconds, steps, elapsed, "plan")
        # Here, after every other callback's after_batch (this one runs last), not in
        # before_batch: a batch cancelled there would leave the precision callbacks' autocast on.
        if self.learn.planned_steps is not None and steps >= self.learn.planned_steps:
            raise CancelTrainException()

    def after_train(self):
        """Measure the pace since the plan again (the epoch's own costs now included) and re-plan
        the steps not yet taken to it (:func:`~carp_fast.budget.replan` decides)."""
        if self._planned_at is None or self.learn.planned_steps is None:
            return  # no plan yet, or one restored from a checkpoint (this process's clock is newer)
        planned_time, steps0, eval_total0 = self._planned_at
        steps, now = optimizer_steps(self.learn), time.time()
        if steps >= self.learn.planned_steps or steps - steps0 < self.measure:
            return  # the plan is run (its schedules have ended), or too few steps to measure
        pace = (now - planned_time - (self._eval_seconds()[1] - eval_total0)) / (steps - steps0)
        epoch_steps = steps - self.epoch_steps0
        if self.epoch_start >= planned_time and epoch_steps > 0:
            # An epoch begun after the plan: its pace too, if slower (a machine that slows down).
            pace = max(pace, (now - self.epoch_start) / epoch_steps)
        elapsed = self._elapsed()
        fits = self._steps_that_fit(pace, steps, elapsed)
        planned = replan(self.learn.planned_steps, fits, steps, self._steps_per_epoch())
        if planned is not None:
            self._apply(planned, pace, steps, elapsed, "re-plan")

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
        if learn.plan is None and self._elapsed() > self.seconds:  # a whole epoch, unplanned, and the budget spent
            self._warn_too_small(f"it was spent before the steps could be timed (epoch {learn.epoch} took {seconds:.3g} s); "
                                 f"the run ends after this epoch, about {self._elapsed() / 60:.2g} minutes in")
        if main_process_decides(overrun):
            learn.stopped_early = True
            raise CancelFitException()

    # ---- measures and the plan applied --------------------------------------------------

    def _elapsed(self) -> float:
        return time.time() - self._t0

    def _eval_seconds(self) -> tuple[float, float]:
        "How long the k-NN monitor's last evaluation took, and all of them so far (0 without one)."
        monitor = getattr(self.learn, "knn_monitor", None)
        return getattr(monitor, "seconds", 0.0), getattr(monitor, "seconds_total", 0.0)

    def _accumulation(self) -> int:
        accumulation = getattr(self.learn, "gradient_accumulation", None)
        return accumulation.n_steps if accumulation is not None else 1

    def _steps_per_epoch(self) -> int:
        return max(1, self.learn.n_iter // self._accumulation())

    def _steps_that_fit(self, step_seconds: float, steps_done: int, elapsed: float) -> int:
        "The main process's :func:`~carp_fast.budget.steps_that_fit`, on every process."
        monitor = getattr(self.learn, "knn_monitor", None)
        return main_process_value(steps_that_fit(
            budget_seconds=self.seconds, elapsed_seconds=elapsed, margin=self.margin, step_seconds=step_seconds,
            steps_done=steps_done, steps_per_epoch=self._steps_per_epoch(), max_epochs=self._max_epochs,
            epoch=self.learn.epoch, eval_seconds=self._eval_seconds()[0], every=getattr(monitor, "every", 0)))

    def _apply(self, steps: int, step_seconds: float, steps_done: int, elapsed: float, word: str) -> None:
        "Set ``learn.plan``, ``learn.planned_steps`` and ``learn.n_epoch`` to a plan of ``steps``; print it."
        learn, per_epoch = self.learn, self._steps_per_epoch()
        plan = Plan.of(steps, steps_done=steps_done, steps_per_epoch=per_epoch, step_seconds=step_seconds,
                       elapsed_seconds=elapsed, eval_seconds=self._eval_seconds()[0])
        learn.plan, learn.planned_steps, learn.n_epoch = plan.as_dict(), plan.steps, plan.epochs
        if word == "plan" and (steps < per_epoch or plan.minutes > self.seconds / 60):
            self._warn_too_small(f"an epoch is {per_epoch} steps at {step_seconds:.3g} s a step ({per_epoch * step_seconds / 60:.2g} "
                                 f"minutes); the run takes {steps} steps, about {plan.minutes:.2g} minutes in all")
        if getattr(learn, "accelerator", None) is None or learn.accelerator.is_main_process:
            world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
            batch = find_bs(learn.xb) * self._accumulation() * world
            print(f"{word}: {steps} steps of batch {batch} ({steps / per_epoch:.1f} epochs), "
                  f"{step_seconds:.3g} s a step: about {plan.minutes:.1f} of {self.seconds / 60:g} minutes", flush=True)

    def _warn_too_small(self, detail: str) -> None:
        "Once, on the main process: one line on stderr saying that the budget does not fit one epoch, and what the run does."
        learn = self.learn
        if self._warned or not (getattr(learn, "accelerator", None) is None or learn.accelerator.is_main_process):
            return
        self._warned = True
        print(f"warning: --minutes {self.seconds / 60:g} is too small for one epoch here: {detail}", file=sys.stderr, flush=True)
