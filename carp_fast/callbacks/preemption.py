"""Checkpoints in the middle of an epoch: at a signal (preemption, Ctrl-C) and every few minutes."""

from __future__ import annotations

import signal
import threading
import time

from fastai.callback.core import Callback, CancelFitException

from ..distributed import main_process, shared_flags
from .accumulation import optimizer_steps
from .checkpointer import Checkpointer
from .stand_aside import stands_aside

EXIT_PREEMPTED = 75  # sysexits' EX_TEMPFAIL, "try again later": a requeue script resumes on it
DEFAULT_SIGNALS = ("SIGTERM", "SIGINT", "SIGUSR1")
ABORT_AFTER = 3  # the third signal aborts without a checkpoint (an escape from a stuck save)


class Preemption(Callback):
    """Writes a resumable checkpoint at the end of an optimizer step when a signal arrives (and
    then ends the fit), or when ``minutes`` have passed since the last checkpoint.

    A cluster preempts a job with SIGTERM (SLURM: also a chosen signal some time before the
    time limit, e.g. ``--signal=USR1@180``), a user with Ctrl-C (SIGINT). The handler only
    records the signal; the step in flight finishes, then every process learns of it in one
    small all-reduce per optimizer step (a decision all ranks share: any rank's signal stops
    all), the checkpoint is written there with the batch reached in the epoch, one line says
    where the run stopped and how to resume, and ``fit`` returns with ``learn.preempted`` set to
    the signal's name (:func:`carp_fast.run.pretrain` then exits with :data:`EXIT_PREEMPTED`).
    Signals during the save are recorded, not acted on; the third one aborts at once.
    Handlers are installed in ``before_fit`` (main thread only) and the previous ones put back
    by :meth:`release`, in ``after_fit`` and, when ``fit`` raises, by
    :class:`~carp_fast.learner.PretrainLearner` (in another Learner, call ``release()`` after
    a failed fit, or a later Ctrl-C is only recorded).

    Needs the run's :class:`Checkpointer` (its file and settings); the checkpoint holds the
    batch of the epoch reached, so ``--resume`` continues from it exactly
    (:class:`~carp_fast.learner.PretrainLearner`).

    Args:
        minutes: wall-clock minutes between step checkpoints (None: only at a signal and at
            epoch ends).
        signals: names of the signals that stop with a checkpoint.
    """

    order, run_valid = Checkpointer.order + 2, False  # after TimeBudget: a step it ends needs no save

    def __init__(self, minutes: float | None = None, signals=DEFAULT_SIGNALS):
        if minutes is not None and minutes <= 0:
            raise ValueError(f"minutes must be > 0 (or None), got {minutes}")
        unknown = [name for name in signals if not isinstance(getattr(signal, name, None), signal.Signals)]
        if unknown:
            raise ValueError(f"signals: unknown signal names {unknown}; e.g. {', '.join(DEFAULT_SIGNALS)}")
        self.seconds = None if minutes is None else 60.0 * minutes
        self.signals = tuple(getattr(signal, name) for name in signals)
        self.received: list[str] = []
        self._previous: dict = {}

    # ---- signals ----------------------------------------------------------------------------

    def _handle(self, signum, frame):
        self.received.append(signal.Signals(signum).name)
        if len(self.received) >= ABORT_AFTER:
            self.release()
            raise KeyboardInterrupt(f"{len(self.received)} signals: aborted without a checkpoint")

    def release(self):
        "Put the previous signal handlers back (idempotent)."
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}

    def before_fit(self):
        self.run = not stands_aside(self.learn)
        if not self.run:
            return
        self.learn.preempted, self.received = None, []
        self._last_save = time.time()
        if threading.current_thread() is threading.main_thread():  # Python installs handlers there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.signals}

    def after_fit(self):
        self.release()

    # ---- at the end of each optimizer step ------------------------------------------------------

    def after_batch(self):
        accumulation = getattr(self.learn, "gradient_accumulation", None)
        if accumulation is not None and self.learn.train_iter % accumulation.n_steps:
            return  # inside an optimizer step
        due = self.seconds is not None and main_process() and time.time() - self._last_save >= self.seconds
        stop, save = shared_flags(bool(self.received), due)  # one all-reduce: any rank's signal, rank 0's clock
        if save and not stop and self._checkpointer_saves_now():
            self._last_save = time.time()  # the epoch's own checkpoint follows at once
        elif stop or save:
            self._save()
        if stop:
            self._stop()

    def _checkpointer_saves_now(self) -> bool:
        "True at the last batch of an epoch the Checkpointer saves at its end."
        learn, checkpointer = self.learn, self.learn.checkpointer
        last_batch = learn.iter + 1 == learn.n_iter
        return last_batch and ((learn.epoch + 1) % checkpointer.every == 0 or learn.epoch == learn.n_epoch - 1)

    def _save(self):
        from carp_fast.checkpoint import save_checkpoint

        learn, checkpointer = self.learn, self.learn.checkpointer
        epoch, batch = learn.epoch, learn.iter + 1
        if batch == learn.n_iter:  # the epoch's last batch: the checkpoint starts the next epoch
            epoch, batch = epoch + 1, 0
        self.where = (epoch, batch)
        save_checkpoint(learn, checkpointer.file, next_epoch=epoch, settings=checkpointer.settings, batch=batch,
                        keep=checkpointer.keep)
        self._last_save = time.time()

    def _stop(self):
        learn, (epoch, batch) = self.learn, self.where
        name = (self.received or ["a signal on another process"])[0]
        learn.preempted = name
        if main_process():
            where = f"in epoch {epoch + 1} after batch {batch} of {learn.n_iter}" if batch else f"at the end of epoch {epoch}"
            print(f"stopped by {name} {where} (optimizer step {optimizer_steps(learn)}): checkpoint "
                  f"{learn.checkpointer.file}; run the same command with --resume to continue", flush=True)
        raise CancelFitException()
