"""Training-health logging for MaSSL: loss, schedules, agreement and memory usage."""

from __future__ import annotations

import math
import warnings

import torch
from fastai.callback.core import Callback

from ..callbacks.accumulation import optimizer_steps
from ..distributed import any_process
from ..callbacks.carp_stats import CollapseWarning, NonFiniteLossError, _step_of, assignment_stats
from ..callbacks.teacher_ema import TeacherEMA


class MaSSLStats(Callback):
    """CARP's :class:`~carp_fast.callbacks.CARPStats` for MaSSL, with the same outputs.

    Losses stay on the device; every ``every`` training batches (and at the end of each
    epoch) their mean and the current batch's assignment statistics reach the host in one
    transfer, go to ``self.history`` and ``learn.carp_log`` (which the progress display and
    :class:`~carp_fast.callbacks.MetricsLogger` read), and ``learn.carp_epoch`` sums up each
    epoch. Statistics (:func:`~carp_fast.callbacks.carp_stats.assignment_stats` over memory
    slots): agreement (student and teacher views whose most similar memory slot is the same),
    ``slots_hit`` and the perplexity of the teacher's nearest slots. A non-finite loss raises
    :class:`~carp_fast.callbacks.NonFiniteLossError`; a perplexity below ``collapse_fraction``
    of the assignments a :class:`~carp_fast.callbacks.CollapseWarning`.

    ``entropy`` is logged as 0 (MaSSL has no entropy term) so that CARP's progress line and
    metrics keep one format. Expects ``learn.loss_func.last`` (a
    :class:`~carp_fast.massl.loss.MaSSLLoss`), ``learn.pred`` a
    :class:`~carp_fast.massl.loss.MaSSLOutput` and ``learn.model.memory``.
    """

    order, run_valid = TeacherEMA.order + 1, False
    name = "massl_stats"  # learn.massl_stats (fastai would make it ma_ssl_stats)

    def __init__(self, every: int = 50, collapse_fraction: float = 0.05):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.collapse_fraction = every, collapse_fraction
        self.history: list[dict] = []

    def before_fit(self):
        "Start a fresh history."
        self.history, self._losses = [], []

    def after_batch(self):
        "Keep the loss on the device; log every `every` batches."
        if self.learn.loss_func.last is None:
            return
        self._losses.append(self.learn.loss_func.last.float())
        if self.learn.train_iter % self.every == 0:
            self._log()

    def after_train(self):
        "Log what is left of the epoch; summarise it in `learn.carp_epoch`."
        if self._losses:
            self._log()
        records = [r for r in self.history if r["epoch"] == self.learn.epoch]
        if records:
            n = sum(r["batches"] for r in records)
            summary = {k: sum(r[k] * r["batches"] for r in records) / n for k in ("loss", "agreement")}
            summary.update({k: records[-1][k] for k in ("step", "micro_batch", "lr", "momentum", "teacher_temperature", "slots_hit", "perplexity")})
            self.learn.carp_epoch = summary

    def _log(self):
        pred = self.learn.pred
        memory = getattr(self.learn.model, "module", self.learn.model).memory
        stats = assignment_stats(pred.student, pred.teacher, pred.partition, memory.size)  # [3]
        losses = torch.stack(self._losses)  # [n_batches]
        values = torch.cat([stats, losses]).tolist()  # the one host sync
        losses, first_step = values[3:], self.learn.train_iter - len(self._losses) + 1
        self._losses = []
        bad = [i for i, v in enumerate(losses) if not math.isfinite(v)]
        if any_process(bool(bad)) and not bad:  # every rank stops at the same logging step
            raise NonFiniteLossError(
                f"the MaSSL loss became non-finite on another process by optimizer step {optimizer_steps(self.learn)} "
                f"(epoch {self.learn.epoch}); training stopped on every process"
            )
        if bad:
            raise NonFiniteLossError(
                f"the MaSSL loss is {losses[bad[0]]} at {_step_of(self.learn, first_step + bad[0])} (epoch {self.learn.epoch}); "
                "training stopped, the last checkpoint is the last good state. Lower the learning rate or "
                "the teacher temperature, use bf16 instead of fp16, or check the data."
            )
        record = dict(
            epoch=self.learn.epoch, step=optimizer_steps(self.learn), micro_batch=self.learn.train_iter, batches=len(losses), loss=sum(losses) / len(losses),
            agreement=values[0], slots_hit=values[1], perplexity=values[2],
            lr=self.learn.opt.hypers[0]["lr"], momentum=getattr(self.learn, "teacher_momentum", float("nan")),
            teacher_temperature=getattr(self.learn, "teacher_temperature", float("nan")),
        )
        self.history.append(record)
        self.learn.carp_log = record
        n_assignments = pred.teacher.shape[0] * pred.teacher.shape[1]
        threshold = max(2.0, self.collapse_fraction * min(pred.partition.numel(), n_assignments))
        if record["perplexity"] < threshold and n_assignments > 2:
            warnings.warn(
                f"MaSSL assignments are collapsing at step {record['step']}: the teacher's {n_assignments} "
                f"views have {int(record['slots_hit'])} distinct nearest memory slots (perplexity "
                f"{record['perplexity']:.2f} < {threshold:.2f}); check the learning rate, the teacher "
                "temperature and the augmentations",
                CollapseWarning, stacklevel=2,
            )
