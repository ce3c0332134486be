"""Saves a resumable checkpoint at the end of epochs."""

from __future__ import annotations

from pathlib import Path

from fastai.callback.core import Callback

from .metrics_logger import MetricsLogger


class Checkpointer(Callback):
    """Writes ``out/checkpoint.pth`` every ``every`` epochs and after the last one.

    Runs after the metrics of the epoch are written, on every process (each rank's random
    states and the accumulated gradients are gathered); the main process writes. See
    :mod:`carp_fast.checkpoint` for what it holds.

    Args:
        out: the run directory.
        settings: the run's settings (stored, and compared on ``--resume``).
        every: epochs between checkpoints.
    """

    order, run_valid = MetricsLogger.order + 1, False

    def __init__(self, out, settings: dict, every: int = 1):
        from carp_fast.checkpoint import CHECKPOINT_NAME

        self.file, self.settings, self.every = Path(out) / CHECKPOINT_NAME, settings, every

    def after_epoch(self):
        "Save on schedule."
        from carp_fast.checkpoint import save_checkpoint

        last = self.learn.epoch == self.learn.n_epoch - 1
        if (self.learn.epoch + 1) % self.every == 0 or last:
            save_checkpoint(self.learn, self.file, next_epoch=self.learn.epoch + 1, settings=self.settings)
