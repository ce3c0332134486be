"""Resumable checkpoints: written at the end of epochs, restored at the start of a resumed fit."""

from __future__ import annotations

from pathlib import Path

from fastai.callback.core import Callback

from .metrics_logger import MetricsLogger
from .stand_aside import stands_aside


class Checkpointer(Callback):
    """Writes ``out/checkpoint.pth`` every ``every`` epochs and after the last one, keeping the
    ``keep`` newest (``checkpoint.1.pth`` ...); with ``resume=True`` it first puts everything
    back from the newest that verifies: the one place a run resumes.

    Writing runs after the epoch's metrics line (so a kill between the two loses no line),
    on every process (each rank's random states and the accumulated gradients are
    gathered); the main process writes, and a non-finite state is refused
    (:class:`~carp_fast.checkpoint.NonFiniteStateError`). Resuming reads the newest checkpoint
    that verifies (skipping corrupt ones with a warning) and compares its settings with
    ``settings`` when the callback is made (a clear error before anything starts), and
    restores weights, optimizer, GradScaler, accumulated gradients, random states, step
    counters and the epoch to start at in ``before_fit``, after fastai has reset its counters
    and the GradScaler exists. See :mod:`carp_fast.checkpoint` for the file.

    Args:
        out: the run directory.
        settings: the run's settings (stored, and compared on resume).
        every: epochs between checkpoints.
        resume: continue from ``out/checkpoint.pth`` (or the newest older one that verifies).
        keep: checkpoints kept (None: :data:`~carp_fast.checkpoint.KEEP`, 2).
    """

    order, run_valid = MetricsLogger.order + 1, False

    def __init__(self, out, settings: dict, every: int = 1, resume: bool = False, keep: int | None = None):
        from carp_fast.checkpoint import CHECKPOINT_NAME, KEEP, check_same_run, load_newest_checkpoint

        self.file, self.settings, self.every = Path(out) / CHECKPOINT_NAME, settings, every
        self.keep = KEEP if keep is None else keep
        self._keep = {} if keep is None else {"keep": keep}  # passed only when set: wrappers of the older signature work
        self.resume_state = self.resumed_from = None
        if resume:
            self.resumed_from, self.resume_state = load_newest_checkpoint(self.file)
            check_same_run(self.resume_state["settings"], settings, self.resumed_from)

    def before_fit(self):
        "Resume (once): put the saved state back."
        self.run = not stands_aside(self.learn)
        if self.resume_state is None or not self.run:
            return
        from accelerate.state import PartialState

        from carp_fast.checkpoint import restore_checkpoint

        state = self.resume_state
        restore_checkpoint(self.learn, state)
        batch = state.get("batch", 0)
        self.learn.last_checkpoint = {"path": str(self.resumed_from), "epoch": state["epoch"], "batch": batch}
        PartialState().print(f"resuming {self.resumed_from} at epoch {state['epoch']}" + (f", batch {batch}" if batch else ""))
        self.resume_state = None

    def after_epoch(self):
        "Save on schedule."
        from carp_fast.checkpoint import save_checkpoint

        last = self.learn.epoch == self.learn.n_epoch - 1
        if (self.learn.epoch + 1) % self.every == 0 or last:
            save_checkpoint(self.learn, self.file, next_epoch=self.learn.epoch + 1, settings=self.settings, **self._keep)
