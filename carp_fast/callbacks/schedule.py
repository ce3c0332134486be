"""Hyper-parameter schedules read once per optimizer step, at the index the official CARP code reads."""

from __future__ import annotations

from fastai.callback.schedule import ParamScheduler

from .stand_aside import stands_aside


class OptimizerStepScheduler(ParamScheduler):
    """fastai's :class:`~fastai.callback.schedule.ParamScheduler`, one value per optimizer step.

    fastai moves a schedule every batch (``pct_train = batch / total batches``), so with
    gradient accumulation the micro-batches of one step see different values. Here every
    micro-batch of optimizer step ``s`` uses the value at the micro-batch that steps
    (:func:`step_progress`), which is where the official ``main_carp.py`` reads its
    per-micro-batch ``lr_schedule[it]``. Without accumulation it equals fastai's.

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
    """The fit's progress at optimizer step ``s`` (0-based): ``((s + 1) A - 1) / (S A)``.

    The official code builds its schedules (learning rate, weight decay, teacher momentum)
    with one entry per micro-batch, ``S A`` of them, and reads entry ``it`` at the micro-batch
    that steps; with ``A`` micro-batches per step that is ``it = (s + 1) A - 1``. Every
    micro-batch of a step gets the step's value. Without accumulation (``A = 1``) this is
    ``s / S``, fastai's ``pct_train``.

    ``S`` is ``learn.planned_steps`` where a :class:`~carp_fast.callbacks.TimeBudget` has
    planned the fit, else the fit's micro-batches // A. An accumulation is carried across
    an epoch's end (the official loop forces a short step there instead; FIDELITY.md gives
    the size of that difference). ``A`` is ``learn.gradient_accumulation.n_steps`` (1 if absent).
    """
    n_acc = _accumulation(learn)
    stepping_micro_batch = (learn.train_iter // n_acc + 1) * n_acc - 1
    return min(1.0, stepping_micro_batch / schedule_length(learn))


def schedule_length(learn) -> int:
    """``S A``: the micro-batches of the fit's ``S`` optimizer steps, the length of the official
    per-micro-batch schedules (``S`` as in :func:`step_progress`)."""
    n_acc = _accumulation(learn)
    total_steps = max(1, getattr(learn, "planned_steps", None) or (learn.n_epoch * learn.n_iter) // n_acc)
    return total_steps * n_acc


def _accumulation(learn) -> int:
    return getattr(getattr(learn, "gradient_accumulation", None), "n_steps", 1)
