"""A time budget's arithmetic: how many optimizer steps fit in it, and when a plan changes.

Pure functions of plain numbers (seconds, optimizer steps, epochs): no Learner, no clock, no
processes. The :class:`~carp_fast.callbacks.TimeBudget` callback measures the numbers, calls
these and applies the result (its module says why a budget is planned rather than cut).

A plan is the fit's whole length in optimizer steps, those already taken included: it is the
schedules' length, so a plan (or a re-plan) may only move steps not yet taken. Every plan
therefore keeps at least one step still to take (while the fit's epochs allow one): its last
step then runs at the plan's length and the schedules end where they should, even when the
budget is already spent (a step over is better than a schedule left unfinished).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

LENGTHEN_PERCENT = 1  # a plan grows only when this many percent more steps fit (an epoch's at most)


@dataclass(frozen=True)
class Plan:
    """A fit sized to a budget.

    Attributes:
        steps: optimizer steps of the whole fit, those already taken included (the schedules' length).
        epochs: the epochs they take, the last one possibly cut short: ``ceil(steps / steps_per_epoch)``
            (at least 1).
        step_seconds: the pace it was planned at, in seconds per optimizer step.
        minutes: the expected length of the whole run at that pace, in minutes: from the budget's
            start to the end of the final k-NN evaluation.
    """

    steps: int
    epochs: int
    step_seconds: float
    minutes: float

    @classmethod
    def of(cls, steps: int, *, steps_done: int, steps_per_epoch: int, step_seconds: float,
           elapsed_seconds: float, eval_seconds: float = 0.0) -> Plan:
        """The plan of ``steps`` optimizer steps, ``steps_done`` of them taken after ``elapsed_seconds``
        (the rest at ``step_seconds`` each, then a final evaluation of ``eval_seconds``)."""
        minutes = (elapsed_seconds + (steps - steps_done) * step_seconds + eval_seconds) / 60
        epochs = max(1, math.ceil(steps / steps_per_epoch))
        return cls(steps=steps, epochs=epochs, step_seconds=step_seconds, minutes=minutes)

    def as_dict(self) -> dict:
        "The plan as ``learn.plan`` and the checkpoint keep it: steps, epochs, step_seconds, minutes."
        return asdict(self)


def steps_that_fit(*, budget_seconds: float, elapsed_seconds: float, margin: float, step_seconds: float,
                   steps_done: int, steps_per_epoch: int, max_epochs: int, epoch: int = 0, eval_seconds: float = 0.0,
                   every: int = 0) -> int:
    """The optimizer steps of a fit (``steps_done`` included) that end, its evaluations included,
    inside the budget less its margin.

    What is left, ``budget_seconds (1 - margin) - elapsed_seconds``, less a final k-NN evaluation
    as long as the last one (``eval_seconds``), is filled with steps of ``step_seconds``; then,
    with a monitor that evaluates every ``every`` epochs, the evaluations due from epoch ``epoch``
    until the plan's last one (left out: reserved already) are taken off too. At most the steps
    of ``max_epochs`` epochs; at least ``steps_done + 1`` (see the module), unless those epochs
    are done.

    Args:
        budget_seconds: the whole budget, seconds.
        elapsed_seconds: seconds since the budget's start.
        margin: the share of the budget kept free (the export, jitter), in [0, 1).
        step_seconds: the measured pace, seconds per optimizer step (> 0).
        steps_done: optimizer steps taken in the fit so far.
        steps_per_epoch: optimizer steps in an epoch (>= 1).
        max_epochs: the most epochs (``fit``'s).
        epoch: the current epoch, 0-based (its own evaluation, at its end, is still due).
        eval_seconds: seconds of the monitor's last k-NN evaluation (0: none measured yet).
        every: epochs between the monitor's evaluations (0: no monitor).
    """
    most = max_epochs * steps_per_epoch
    left = budget_seconds * (1 - margin) - elapsed_seconds - eval_seconds  # the final evaluation reserved
    steps = min(most, steps_done + max(0, math.floor(left / step_seconds)))
    if every and eval_seconds:
        last = math.ceil(steps / steps_per_epoch) - 1  # the plan's last epoch: its evaluation is the final one
        evaluations = max(0, last // every - epoch // every)  # epochs e in [epoch, last) with (e + 1) % every == 0
        steps = min(steps, steps_done + max(0, math.floor((left - evaluations * eval_seconds) / step_seconds)))
    return max(steps, min(steps_done + 1, most), steps_done)


def plan_steps(*, budget_seconds: float, elapsed_seconds: float, margin: float, step_seconds: float, steps_done: int,
               steps_per_epoch: int, max_epochs: int, epoch: int = 0, eval_seconds: float = 0.0,
               every: int = 0) -> Plan:
    """The :class:`Plan` of the :func:`steps_that_fit` (the same arguments, the same units)."""
    steps = steps_that_fit(budget_seconds=budget_seconds, elapsed_seconds=elapsed_seconds, margin=margin,
                           step_seconds=step_seconds, steps_done=steps_done, steps_per_epoch=steps_per_epoch,
                           max_epochs=max_epochs, epoch=epoch, eval_seconds=eval_seconds, every=every)
    return Plan.of(steps, steps_done=steps_done, steps_per_epoch=steps_per_epoch, step_seconds=step_seconds,
                   elapsed_seconds=elapsed_seconds, eval_seconds=eval_seconds)


def lengthen_threshold(current: int, steps_per_epoch: int) -> int:
    """The fewest more steps that lengthen a plan of ``current`` steps: 1 % of it (rounded up), at
    most an epoch's steps, at least 1 (a pace measured again is noisy: no re-plan for a step or two)."""
    return max(1, min(steps_per_epoch, -(-current * LENGTHEN_PERCENT // 100)))


def replan(current: int, fits: int, steps_done: int, steps_per_epoch: int) -> int | None:
    """The new length of a plan of ``current`` optimizer steps, or None to keep it.

    ``fits`` is :func:`steps_that_fit` at the pace measured again. The plan shrinks whenever
    fewer steps fit, and grows when at least :func:`lengthen_threshold` more do. It only moves
    steps not yet taken: once ``steps_done`` reaches the plan it is kept (its schedules have
    ended), and a new length is at least ``steps_done + 1``, so its last step still runs at it.
    """
    if steps_done >= current:
        return None
    fits = max(fits, steps_done + 1)
    if fits < current or fits >= current + lengthen_threshold(current, steps_per_epoch):
        return fits
    return None
