"""The teacher temperature of MaSSL: linear warm-up over the first epochs, then constant."""

from __future__ import annotations

from fastai.callback.core import Callback

from ..callbacks.teacher_ema import TeacherEMA


def teacher_temperature(epoch: float, start: float = 0.04, end: float = 0.07, warmup_epochs: float = 30) -> float:
    """tau_t at a (fractional) epoch: ``start`` -> ``end`` linearly over ``warmup_epochs``.

    The official code (``cosine_scheduler`` with ``warmup_epochs``) does the same per step:
    30 warm-up epochs for ViT-S, 50 for ViT-B. ``warmup_epochs = 0`` is constant ``end``.
    """
    if warmup_epochs <= 0:
        return end
    return start + (end - start) * min(max(epoch / warmup_epochs, 0.0), 1.0)


class TeacherTemperatureWarmup(Callback):
    """Sets ``learn.loss_func.teacher_temperature`` before every training batch.

    A pure function of the fractional epoch (``epoch + iter / n_iter``), so a resumed run
    continues the schedule exactly; the value is kept in ``learn.teacher_temperature``.

    Args:
        start, end, warmup_epochs: see :func:`teacher_temperature`.
    """

    order, run_valid = TeacherEMA.order - 10, False  # before_batch: before the forward and the loss

    def __init__(self, start: float = 0.04, end: float = 0.07, warmup_epochs: float = 30):
        if start <= 0 or end <= 0 or warmup_epochs < 0:
            raise ValueError(f"temperatures must be > 0 and warmup_epochs >= 0, got {start}, {end}, {warmup_epochs}")
        self.start, self.end, self.warmup_epochs = start, end, warmup_epochs

    def before_batch(self):
        "Schedule tau_t from the progress of the fit."
        epoch = self.learn.epoch + self.learn.iter / max(self.learn.n_iter, 1)
        tau = teacher_temperature(epoch, self.start, self.end, self.warmup_epochs)
        self.learn.loss_func.teacher_temperature = tau
        self.learn.teacher_temperature = tau
