"""Hyper-parameter schedules indexed by optimizer step, as the official CARP code indexes them."""

from __future__ import annotations

from fastai.callback.schedule import ParamScheduler

from .stand_aside import stands_aside


class OptimizerStepScheduler(ParamScheduler):
    """fastai's :class:`~fastai.callback.schedule.ParamScheduler`, advanced per optimizer step.

    fastai moves a schedule every batch (``pct_train = batch / total batches``). With gradient
    accumulation over ``n`` micro-batches that puts the first optimizer step at
    ``pct = (n - 1) / total`` instead of 0, so no step ever sees the peak learning rate. Here
    every micro-batch of optimizer step ``s`` uses ``pct = s / S`` (``S`` optimizer steps in
    the fit): the official ``cosine_scheduler`` array indexed by iteration. Without
    accumulation it equals fastai's.

    Reads the accumulation from ``learn.gradient_accumulation.n_steps`` (1 if absent). Stands
    aside under ``learn.lr_find()``, whose own schedule sweeps the learning rate.
    """

    def before_fit(self):
        "Stand aside under lr_find; otherwise as fastai's."
        self.run = not stands_aside(self.learn)
        if self.run:
            super().before_fit()

    def before_batch(self):
        "Set every scheduled hyper-parameter for the current optimizer step."
        self._update_val(step_progress(self.learn))


def step_progress(learn) -> float:
    """``s / S`` during optimizer step ``s`` (0-based) of the fit's ``S``: the position in the
    official per-iteration schedules (learning rate, weight decay, teacher momentum). Every
    micro-batch of a step has the step's value; without accumulation it is fastai's
    ``pct_train``. ``S`` is ``learn.planned_steps`` where a :class:`~carp_fast.callbacks.TimeBudget`
    has planned the fit, else its epochs x batches. Reads ``learn.gradient_accumulation.n_steps``
    (1 if absent)."""
    n_acc = getattr(getattr(learn, "gradient_accumulation", None), "n_steps", 1)
    total_steps = max(1, getattr(learn, "planned_steps", None) or (learn.n_epoch * learn.n_iter) // n_acc)
    return min(1.0, (learn.train_iter // n_acc) / total_steps)
