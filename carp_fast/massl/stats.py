"""Training-health logging for MaSSL: loss, schedules, agreement and memory usage."""

from __future__ import annotations

import torch

from ..callbacks.carp_stats import CARPStats


class MaSSLStats(CARPStats):
    """CARP's :class:`~carp_fast.callbacks.CARPStats` for MaSSL, with the same outputs.

    The loss stays on the device; every ``every`` training batches (and at the end of each
    epoch) its mean and the current batch's assignment statistics reach the host in one
    transfer, go to ``self.history`` and ``learn.carp_log`` (which the progress display and
    :class:`~carp_fast.callbacks.MetricsLogger` read), and ``learn.carp_epoch`` sums up each
    epoch. Statistics over memory slots: agreement (student and teacher views whose most
    similar memory slot is the same), ``slots_hit`` and the perplexity of the teacher's
    nearest slots, and the teacher temperature. The non-finite stop (shared by every
    process) and the collapse warning are CARPStats'. Expects ``learn.loss_func.last`` (a
    :class:`~carp_fast.massl.loss.MaSSLLoss`), ``learn.pred`` a
    :class:`~carp_fast.loss.BlockLogits` and ``learn.model.memory``.
    """

    name = "massl_stats"  # learn.massl_stats (fastai would make it ma_ssl_stats)
    METHOD = "MaSSL"
    TERMS = ("loss",)  # no entropy term
    HIT = "slots_hit"
    ADVICE = "the learning rate, the teacher temperature and the augmentations"

    def batch_terms(self) -> torch.Tensor | None:
        last = self.learn.loss_func.last
        return None if last is None else last.float()[None]

    def n_targets(self) -> int:
        return getattr(self.learn.model, "module", self.learn.model).memory.size

    def extra(self) -> dict:
        return {"teacher_temperature": getattr(self.learn, "teacher_temperature", float("nan"))}
