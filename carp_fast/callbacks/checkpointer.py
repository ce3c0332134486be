"""Resumable checkpoints: written at the end of epochs, restored at the start of a resumed fit."""

from __future__ import annotations

from pathlib import Path

from fastai.callback.core import Callback

from .metrics_logger import MetricsLogger
from .stand_aside import stands_aside


class Checkpointer(Callback):
    """Writes ``out/checkpoint.pth`` every ``every`` epochs and after the last one; with
    ``resume=True`` it first puts everything back from that file: the one place a run resumes.

    Writing runs after the epoch's metrics line (so a kill between the two loses no line),
    on every process (each rank's random states and the accumulated gradients are
    gathered); the main process writes. Resuming reads the file and compares its settings
    with ``settings`` when the callback is made (a clear error before anything starts), and
    restores weights, optimizer, GradScaler, accumulated gradients, random states, step
    counters and the epoch to start at in ``before_fit``, after fastai has reset its counters
    and the GradScaler exists. See :mod:`carp_fast.checkpoint` for the file.

    Args:
        out: the run directory.
        settings: the run's settings (stored, and compared on resume).
        every: epochs between checkpoints.
        resume: continue from ``out/checkpoint.pth``.
    """

    order, run_valid = MetricsLogger.order + 1, False

    def __init__(self, out, settings: dict, every: int = 1, resume: bool = False):
        from carp_fast.checkpoint import CHECKPOINT_NAME, check_same_run, load_checkpoint

        self.file, self.settings, self.every = Path(out) / CHECKPOINT_NAME, settings, every
        self.resume_state = None
        if resume:
            self.resume_state = load_checkpoint(self.file)
            check_same_run(self.resume_state["settings"], settings, self.file)

    def before_fit(self):
        "Resume (once): put the saved state back."
        self.run = not stands_aside(self.learn)
        if self.resume_state is None or not self.run:
            return
        from accelerate.state import PartialState

        from carp_fast.checkpoint import restore_checkpoint

        restore_checkpoint(self.learn, self.resume_state)
        PartialState().print(f"resuming {self.file} at epoch {self.resume_state['epoch']}")
        self.resume_state = None

    def after_epoch(self):
        "Save on schedule."
        from carp_fast.checkpoint import save_checkpoint

        last = self.learn.epoch == self.learn.n_epoch - 1
        if (self.learn.epoch + 1) % self.every == 0 or last:
            save_checkpoint(self.learn, self.file, next_epoch=self.learn.epoch + 1, settings=self.settings)
