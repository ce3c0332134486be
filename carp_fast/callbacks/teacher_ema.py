"""Teacher update: an exponential moving average of the student after every optimizer step."""

from __future__ import annotations

import torch
from fastai.callback.core import Callback
from fastai.callback.fp16 import MixedPrecision
from fastai.callback.schedule import sched_cos

from ..distributed import unwrap
from .schedule import step_progress


def teacher_momentum(base: float, progress: float) -> float:
    """Cosine schedule of the teacher momentum from ``base`` (progress 0) to 1 (progress 1).

    ``m(p) = 1 - (1 - base) * (cos(pi * p) + 1) / 2``, as in BYOL, DINO and the paper.
    """
    return sched_cos(base, 1.0, min(max(progress, 0.0), 1.0))


@torch.no_grad()
def ema_update(teacher: list[torch.Tensor], student: list[torch.Tensor], momentum: float) -> None:
    """``teacher <- m * teacher + (1 - m) * student`` for all tensors in one fused kernel."""
    torch._foreach_lerp_(teacher, student, 1.0 - momentum)


class TeacherEMA(Callback):
    """Updates the teacher from the student after each optimizer step.

    The momentum follows :func:`teacher_momentum` over the fit's progress
    (:func:`~carp_fast.callbacks.schedule.step_progress`: the official per-micro-batch schedule
    read at the micro-batch that steps, so the last step sits just below 1.0); the value of
    the last update is kept in ``learn.teacher_momentum``.

    Args:
        base: momentum at the start of the fit (paper: 0.99).
        student, teacher: attribute names of the two networks on ``learn.model``.
    """

    order, run_valid = MixedPrecision.order, False  # after_step: the optimizer (and GradScaler) step is done

    def __init__(self, base: float = 0.99, student: str = "student", teacher: str = "teacher"):
        if not 0.0 <= base <= 1.0:
            raise ValueError(f"base momentum must be in [0, 1], got {base}")
        self.base, self.student_attr, self.teacher_attr = base, student, teacher

    def before_fit(self):
        "Pair up the parameters once: same architecture, same order."
        model = unwrap(self.learn.model)
        if getattr(model, "ema_teacher", True) is False:
            raise ValueError("TeacherEMA: the model has no teacher network (ema_teacher=False, CARL); leave TeacherEMA out")
        student = list(getattr(model, self.student_attr).parameters())
        teacher = list(getattr(model, self.teacher_attr).parameters())
        if len(student) != len(teacher) or any(s.shape != t.shape for s, t in zip(student, teacher)):
            raise ValueError("student and teacher must have the same parameters (shapes and order)")
        self.student_params, self.teacher_params = student, teacher
        self.learn.teacher_momentum = self.base

    def after_step(self):
        "Move the teacher towards the student."
        momentum = teacher_momentum(self.base, step_progress(self.learn))
        # The teacher is a copy of the student (its own tensors, requires_grad=False), updated
        # in place by one fused kernel; no `.data` juggling and no new tensors per step.
        ema_update(self.teacher_params, self.student_params, momentum)
        self.learn.teacher_momentum = momentum
