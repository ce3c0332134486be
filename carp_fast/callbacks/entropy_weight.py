"""lambda_e, the weight of the entropy term: constant, or a cosine decay over the fit (CARL)."""

from __future__ import annotations

import math

from fastai.callback.core import Callback

from .schedule import step_progress
from .teacher_ema import TeacherEMA


def entropy_weight(progress: float, start: float = 1.0, end: float | None = None) -> float:
    """lambda_e at ``progress`` in [0, 1] of the fit: ``start`` when ``end`` is None, else
    ``end + (start - end) * (1 + cos(pi * progress)) / 2``, a cosine from ``start`` to ``end``.

    CARL (Silva & Ramirez Rivera, SAC 2022) decays the weight of its entropy term during
    training (CARP's paper, section 3.1); the shape it used is not known (FIDELITY.md), and
    the cosine is the shape of every other schedule here. Progress outside [0, 1] is clamped.
    """
    if end is None:
        return start
    p = min(max(progress, 0.0), 1.0)
    return end + (start - end) * (1 + math.cos(math.pi * p)) / 2


class EntropyWeightSchedule(Callback):
    """Sets ``learn.loss_func.entropy_weight`` (lambda_e) before every training batch.

    A pure function of :func:`~carp_fast.callbacks.schedule.step_progress` (one value per
    optimizer step, sized to a :class:`~carp_fast.callbacks.TimeBudget`'s plan), so a resumed
    run continues it exactly; the value is kept in ``learn.entropy_weight``.

    Args:
        start, end: see :func:`entropy_weight` (``end`` None: constant ``start``).
    """

    order, run_valid = TeacherEMA.order - 10, False  # before_batch: before the forward and the loss

    def __init__(self, start: float = 1.0, end: float | None = None):
        if start < 0 or (end is not None and end < 0):
            raise ValueError(f"entropy weights must be >= 0, got start={start}, end={end}")
        self.start, self.end = start, end

    def before_batch(self):
        "Set lambda_e for this optimizer step."
        value = entropy_weight(step_progress(self.learn), self.start, self.end)
        self.learn.loss_func.entropy_weight = value
        self.learn.entropy_weight = value
