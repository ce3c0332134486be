"""Training-health logging for CARP: loss terms, schedules, agreement and prototype usage."""

from __future__ import annotations

import math
import warnings

import torch
from fastai.callback.core import Callback

from ..checkpoint import NonFiniteError, last_good
from ..distributed import any_process, unwrap
from .accumulation import optimizer_steps
from .teacher_ema import TeacherEMA


class NonFiniteLossError(NonFiniteError):
    """The loss became NaN or infinite; raised at the next logging step, naming the step and
    the newest good checkpoint (or that none exists)."""


class CollapseWarning(UserWarning):
    """The teacher assigns (almost) every view to the same few prototypes."""


@torch.no_grad()
def assignment_stats(student, teacher, partition, n_prototypes: int) -> torch.Tensor:
    """Agreement and prototype usage of one step, as a device tensor (no host sync).

    Args:
        student: block logits ``[V_s, N, P, B]``.
        teacher: block logits ``[V_t, N, P, B]``.
        partition: ``[P, B]`` prototype indices.
        n_prototypes: K.

    Returns:
        ``[3]``: student-teacher agreement (fraction of pairs (i, j), i != j, whose
        arg-max prototype over all blocks is the same), prototypes hit by the teacher's
        arg-max assignments, and the perplexity ``exp(H)`` of those assignments.
    """
    flat = partition.flatten()
    s_assign = flat[student.flatten(2).argmax(-1)]  # [V_s, N] prototype ids
    t_assign = flat[teacher.flatten(2).argmax(-1)]  # [V_t, N]
    same = (s_assign[:, None, :] == t_assign[None, :, :]).float()  # [V_s, V_t, N]
    other_view = 1.0 - torch.eye(*same.shape[:2], device=same.device)  # [V_s, V_t]
    agreement = (same * other_view[..., None]).sum() / (other_view.sum() * same.shape[-1])
    # Fixed-size histogram over all K prototypes: no data-dependent shapes, no host sync.
    counts = torch.zeros(n_prototypes, device=flat.device).scatter_add_(
        0, t_assign.flatten(), torch.ones(t_assign.numel(), device=flat.device)
    )  # [K]
    p = counts / counts.sum()
    perplexity = torch.exp(-torch.special.xlogy(p, p).sum())
    hit = (counts > 0).sum().float()
    return torch.stack([agreement, hit, perplexity])


def _step_of(learn, micro_batch: int) -> str:
    """'optimizer step S (micro-batch M)' for the M-th micro-batch of the run (1-based)."""
    accumulation = getattr(learn, "gradient_accumulation", None)
    n = accumulation.n_steps if accumulation is not None else 1
    return f"optimizer step {-(-micro_batch // n)} (micro-batch {micro_batch})"


class CARPStats(Callback):
    """Logs loss, consistency, entropy, lr, teacher momentum, agreement and prototype usage.

    Loss terms stay on the device every batch; every ``every`` training batches (and at the
    end of each epoch) their means, the current batch's assignment statistics and the
    interval's losses reach the host in one transfer and are appended to ``self.history`` (a list of dicts)
    and stored in ``learn.carp_log``; ``learn.carp_epoch`` sums up each epoch. Expects
    ``learn.loss_func`` to be a :class:`carp_fast.loss.CARPLoss` and ``learn.pred`` a
    :class:`carp_fast.loss.BlockLogits`. A method with other terms or assignment targets
    subclasses it (:class:`carp_fast.massl.stats.MaSSLStats`) and overrides ``TERMS``,
    ``HIT``, :meth:`batch_terms`, :meth:`n_targets` and :meth:`extra`.

    A NaN or infinite loss raises :class:`NonFiniteLossError` naming the first bad step
    (before any checkpoint of that epoch is written) and the newest good checkpoint
    (``learn.last_checkpoint``, or that none exists), on every process at the same logging
    step (one flag is all-reduced per interval). A :class:`CollapseWarning` is raised (and printed in red) when the perplexity of the
    teacher's assignments falls below ``collapse_fraction * min(K, assignments)`` (at least
    2): every view then lands on a handful of prototypes.
    """

    order, run_valid = TeacherEMA.order + 1, False
    METHOD = "CARP"
    TERMS = ("loss", "consistency", "entropy")  # per batch; the first is the total loss
    HIT = "prototypes_hit"  # distinct assignment targets the teacher's views land on
    ADVICE = "the learning rate, the block size (smaller blocks are more stable) and the augmentations"

    def __init__(self, every: int = 50, collapse_fraction: float = 0.05):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        self.every, self.collapse_fraction = every, collapse_fraction
        self.history: list[dict] = []

    @property
    def KEYS(self) -> tuple[str, ...]:
        return (*self.TERMS, "agreement", self.HIT, "perplexity")

    def batch_terms(self) -> torch.Tensor | None:
        """This batch's loss terms ``[len(TERMS)]`` on the device (None: no loss this batch)."""
        parts = self.learn.loss_func.parts
        return None if parts is None else torch.stack([parts.total, parts.consistency, parts.entropy]).float()

    def n_targets(self) -> int:
        """How many targets the assignments choose among (K prototypes)."""
        return getattr(self.learn.model, "module", self.learn.model).student.prototypes.n_prototypes

    def extra(self) -> dict:
        """Method-specific values added to every record."""
        return {}

    def before_fit(self):
        "Start a fresh history."
        self.history, self._pending = [], []

    def after_batch(self):
        "Keep the loss terms on the device; log every `every` batches."
        terms = self.batch_terms()
        if terms is None:
            return
        self._pending.append(terms)
        if self.learn.train_iter % self.every == 0:
            self._log()

    def after_train(self):
        "Log what is left of the epoch; summarise the epoch in `learn.carp_epoch`."
        if self._pending:
            self._log()
        records = [r for r in self.history if r["epoch"] == self.learn.epoch]
        if records:
            n = sum(r["batches"] for r in records)
            summary = {k: sum(r[k] * r["batches"] for r in records) / n for k in (*self.TERMS, "agreement")}
            last = records[-1]
            summary.update({k: last[k] for k in ("step", "micro_batch", "lr", "momentum", "entropy_weight", self.HIT, "perplexity",
                                                 *self.extra()) if k in last})
            self.learn.carp_epoch = summary

    def _log(self):
        pred = self.learn.pred
        stats = assignment_stats(pred.student, pred.teacher, pred.partition, self.n_targets())
        terms = torch.stack(self._pending)  # [n_batches, len(TERMS)]
        values = torch.cat([terms.mean(0), stats, terms[:, 0]]).tolist()  # the one host sync
        n_keys = len(self.KEYS)
        totals, first_step = values[n_keys:], self.learn.train_iter - len(self._pending) + 1
        self._pending = []
        bad = [i for i, v in enumerate(totals) if not math.isfinite(v)]
        # Every rank stops together, at the same logging step, when any rank's loss is bad.
        if any_process(bool(bad)) and not bad:
            raise NonFiniteLossError(
                f"the {self.METHOD} loss became non-finite on another process by optimizer step {optimizer_steps(self.learn)} "
                f"(micro-batch {self.learn.train_iter}, epoch {self.learn.epoch}); training stopped on every process "
                f"and {last_good(self.learn)}"
            )
        if bad:
            raise NonFiniteLossError(
                f"the {self.METHOD} loss is {totals[bad[0]]} at {_step_of(self.learn, first_step + bad[0])} (epoch {self.learn.epoch}); "
                f"training stopped and {last_good(self.learn)}. Lower the learning rate, "
                "use bf16 instead of fp16, or check the data."
            )
        record = dict(epoch=self.learn.epoch, step=optimizer_steps(self.learn), micro_batch=self.learn.train_iter,
                      batches=len(totals), **dict(zip(self.KEYS, values[:n_keys])))
        record["lr"] = self.learn.opt.hypers[0]["lr"]
        # No teacher network: eta = 0 in the EMA update (the teacher is the student).
        no_teacher = getattr(getattr(self.learn.model, "module", self.learn.model), "ema_teacher", True) is False
        record["momentum"] = getattr(self.learn, "teacher_momentum", 0.0 if no_teacher else float("nan"))
        if hasattr(self.learn, "entropy_weight"):
            record["entropy_weight"] = self.learn.entropy_weight
        record.update(self.extra())
        self.history.append(record)
        self.learn.carp_log = record
        self._check_collapse(record, pred)

    def _check_collapse(self, record, pred):
        n_assignments = pred.teacher.shape[0] * pred.teacher.shape[1]
        threshold = max(2.0, self.collapse_fraction * min(pred.partition.numel(), n_assignments))
        if record["perplexity"] < threshold and n_assignments > 2:
            has_teacher = getattr(unwrap(self.learn.model), "ema_teacher", True)
            target = "the teacher's" if has_teacher else "the targets' (the student's, no teacher)"
            message = (
                f"{self.METHOD} assignments are collapsing at step {record['step']}: {target} "
                f"{n_assignments} assignments use {int(record[self.HIT])} targets "
                f"(perplexity {record['perplexity']:.2f} < {threshold:.2f}); check {self.ADVICE}"
            )
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]WARNING: {message}[/]")
            warnings.warn(message, CollapseWarning, stacklevel=2)
