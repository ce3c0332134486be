"""metrics.jsonl (one JSON object per epoch) and TensorBoard scalars, on the main process."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from fastai.callback.core import Callback

from ..checkpoint import write_atomically
from .accumulation import optimizer_steps
from .progress import RichProgress
from .stand_aside import stands_aside


class MetricsLogger(Callback):
    """Writes one line per epoch to ``out/metrics.jsonl`` and curves to TensorBoard.

    Each line holds epoch, step (optimizer steps so far), micro_batch (micro-batches so far), loss, consistency, entropy, agreement, lr, momentum,
    prototypes_hit, perplexity, images_per_s, data_wait (the share of the epoch spent waiting
    for batches, from :class:`~carp_fast.callbacks.DataWait`), seconds, ``lr_first_step`` and
    ``lr_last_step`` (the learning rate of the epoch's first and last optimizer step: the
    first line shows where the schedule starts, the last line where it ends), and
    knn_top1/knn_top5 in epochs where :class:`~carp_fast.callbacks.KNNMonitor` ran. TensorBoard (``out/tensorboard``)
    gets every interval logged by :class:`~carp_fast.callbacks.CARPStats` against the step.

    A resumed run (``learn.first_epoch`` > 0) drops the lines of that epoch or later, which a
    killed run wrote after its last checkpoint, so no epoch appears twice or goes missing
    (an epoch's line is written at its end, so a mid-epoch checkpoint needs nothing more); a
    line that is not JSON (a torn last line) is dropped with a warning. The file is rewritten
    atomically and each line fsynced before the epoch's checkpoint is written.

    Args:
        out: the run directory.
        tensorboard: also write TensorBoard events to ``out/tensorboard``.
    """

    order, run_valid = RichProgress.order + 5, False  # after KNNMonitor, the Recorder and RichProgress (images/s)

    def __init__(self, out, tensorboard: bool = True):
        self.file, self.tensorboard = Path(out) / "metrics.jsonl", tensorboard

    def before_fit(self):
        "Outputs open at the first training epoch, once a resume has set the epoch to start at."
        from accelerate.state import PartialState

        self.enabled, self.writer, self._opened = PartialState().is_main_process, None, False
        self.run = not stands_aside(self.learn)

    def before_train(self):
        "Open the outputs (main process only, once per fit)."
        if not self.enabled or self._opened:
            return
        self._opened = True
        self.file.parent.mkdir(parents=True, exist_ok=True)
        first_epoch = getattr(self.learn, "first_epoch", 0)
        kept = [text for text, record in self._lines() if record["epoch"] < first_epoch] if first_epoch else []
        write_atomically(self.file, "".join(text + "\n" for text in kept).encode())
        self.writer, self._logged = None, 0
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step drops events a killed run wrote after its last checkpoint.
            self.writer = SummaryWriter(str(self.file.parent / "tensorboard"), purge_step=optimizer_steps(self.learn) or None)
        self._start = time.perf_counter()

    def _lines(self) -> list[tuple[str, dict]]:
        "The lines of an existing file with their records; one that does not parse is dropped, with a warning."
        if not self.file.exists():
            return []
        lines = [(i, text) for i, text in enumerate(self.file.read_text(errors="replace").splitlines(), 1) if text.strip()]
        records = []
        for i, text in lines:
            try:
                record = json.loads(text)
            except ValueError:
                record = None
            if isinstance(record, dict) and isinstance(record.get("epoch"), int):
                records.append((text, record))
            else:
                what = "its torn last line" if i == lines[-1][0] else f"line {i}, not a record"
                print(f"warning: {self.file}: dropping {what} ({text[:60]!r})", file=sys.stderr, flush=True)
        return records

    def before_epoch(self):
        "Forget the previous epoch's learning rates."
        self._lrs = []

    def after_step(self):
        "Note the learning rate of an optimizer step (accumulating micro-batches never get here)."
        self._lrs = [self._lrs[0] if self._lrs else self.learn.opt.hypers[-1]["lr"], self.learn.opt.hypers[-1]["lr"]]

    def after_epoch(self):
        "Append the epoch's line; send the new intervals to TensorBoard."
        if not self.enabled:
            return
        record = {"epoch": self.learn.epoch, **getattr(self.learn, "carp_epoch", {})}
        record["images_per_s"] = getattr(self.learn, "images_per_s", None)
        record["data_wait"] = getattr(self.learn, "data_wait", None)  # share of the epoch spent waiting for batches
        record["seconds"] = time.perf_counter() - self._start
        if self._lrs:
            record.update(lr_first_step=self._lrs[0], lr_last_step=self._lrs[-1])
        knn = getattr(self.learn, "knn_monitor", None)
        if knn is not None and knn.history and knn.history[-1]["epoch"] == self.learn.epoch:
            record.update({k: v for k, v in knn.history[-1].items() if k in ("knn_top1", "knn_top5", "linear_top1")})
        with self.file.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())  # on disk before the epoch's checkpoint: no gap after a crash
        if self.writer is not None:
            stats = getattr(self.learn, "carp_stats", None) or getattr(self.learn, "massl_stats", None)
            for r in (stats.history[self._logged:] if stats is not None else []):
                for k, v in r.items():
                    if k not in ("epoch", "step", "micro_batch", "batches"):
                        self.writer.add_scalar(f"train/{k}", v, r["step"])
            self._logged = len(stats.history) if stats is not None else 0
            for k in ("images_per_s", "knn_top1", "knn_top5", "linear_top1"):
                if record.get(k) is not None:
                    self.writer.add_scalar(f"epoch/{k}", record[k], record.get("step", optimizer_steps(self.learn)))
            self.writer.flush()

    def after_fit(self):
        "Close TensorBoard."
        if getattr(self, "writer", None) is not None:
            self.writer.close()
