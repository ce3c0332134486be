"""Gradient accumulation over micro-batches, without gradient all-reduce until the last."""

from __future__ import annotations

import contextlib

from fastai.callback.core import Callback, CancelBatchException, TrainEvalCallback


class GradientAccumulation(Callback):
    """Steps the optimizer once every ``n_steps`` batches.

    Unlike fastai's own, which counts samples, this counts batches, divides the loss by
    ``n_steps`` (so the step sees the mean gradient of all micro-batches) and skips the
    DistributedDataParallel all-reduce on all but the last micro-batch (``no_sync``).
    Cancelled steps also skip ``after_step`` callbacks (the teacher update) and
    ``zero_grad``.
    """

    # Right after fastai's counters (TrainEvalCallback), before every callback that must know
    # whether this micro-batch ends in a step (precision, schedules, teacher).
    order, run_valid = TrainEvalCallback.order + 5, False

    def __init__(self, n_steps: int = 1):
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        self.n_steps = n_steps

    def before_fit(self):
        "Start counting micro-batches."
        self.count, self._no_sync = 0, contextlib.nullcontext()

    def before_batch(self):
        "Hold back DDP's all-reduce on micro-batches that do not end in a step."
        last = (self.count + 1) % self.n_steps == 0
        no_sync = getattr(self.learn.model, "no_sync", None)
        self._no_sync = no_sync() if (no_sync is not None and not last) else contextlib.nullcontext()
        self._no_sync.__enter__()

    def after_loss(self):
        "Scale the loss that is back-propagated (the logged loss is unchanged)."
        self.learn.loss_grad = self.learn.loss_grad / self.n_steps

    def after_backward(self):
        "Leave no_sync."
        self._no_sync.__exit__(None, None, None)
        self._no_sync = contextlib.nullcontext()

    def after_cancel_batch(self):
        "Never leave no_sync entered."
        self.after_backward()

    def before_step(self):
        "Skip the optimizer step until n_steps micro-batches have accumulated."
        self.count += 1
        if self.count % self.n_steps != 0:
            raise CancelBatchException()


def optimizer_steps(learn) -> int:
    """Optimizer steps taken so far: ``learn.train_iter`` counts micro-batches, and with
    :class:`GradientAccumulation` over n of them a step is every n-th. What "step" means
    wherever a user reads it (logs, metrics, errors, progress)."""
    accumulation = getattr(learn, "gradient_accumulation", None)
    return learn.train_iter // (accumulation.n_steps if accumulation is not None else 1)
