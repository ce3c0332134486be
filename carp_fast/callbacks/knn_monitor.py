"""Periodic weighted k-NN accuracy of the teacher's backbone features during training."""

from __future__ import annotations

import time
import warnings
from datetime import timedelta

import torch.distributed as dist
from fastai.callback.core import Callback

from .accumulation import optimizer_steps
from .carp_stats import CARPStats
from .stand_aside import stands_aside


class KNNMonitor(Callback):
    """Every ``every`` epochs (and after the last), k-NN top-1 of the teacher's features.

    DINO's protocol (``carp_fast.eval.knn``): L2-normalised backbone features, cosine
    similarity, the k nearest training features vote with weight ``exp(sim / T)``. The
    result goes to ``learn.knn_top1`` and ``self.history`` as ``{"epoch", "step",
    "knn_top1", "knn_top5"}``. It runs on the main process only (the teacher's backbone is
    called directly, outside DistributedDataParallel) while the other ranks wait for it
    (:meth:`evaluate_on_main`).

    Args:
        train_dl, valid_dl: labelled loaders of ``(images [N, 3, S, S], labels [N])``
            (e.g. ``carp_fast.pipelines.eval_loader``): the feature bank and the queries.
        every: epochs between evaluations.
        k, temperature: the vote (paper / DINO: 20 and 0.07).
        network: ``"teacher"`` (default, as the paper evaluates) or ``"student"``.
        linear_probe: also train a linear probe on the bank's features, extracted once for
            both, and score it on the queries' (``carp_fast.eval.linear.bank_probe``): its
            top-1 goes to ``self.probe_top1``, ``learn.linear_top1`` and the history as
            ``"linear_top1"``; its seconds count in :attr:`seconds`.
    """

    order, run_valid = CARPStats.order + 1, False
    wait = timedelta(days=1)  # how long the other ranks wait for an evaluation

    def __init__(self, train_dl, valid_dl, every: int = 1, k: int = 20, temperature: float = 0.07, network: str = "teacher",
                 linear_probe: bool = False):
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if network not in ("teacher", "student"):
            raise ValueError(f"network must be 'teacher' or 'student', got {network!r}")
        self.train_dl, self.valid_dl, self.every = train_dl, valid_dl, every
        self.k, self.temperature, self.network = k, temperature, network
        self.linear_probe, self.probe_top1 = linear_probe, None  # the last evaluation's probe (percent)
        self.history: list[dict] = []
        self.seconds = 0.0  # how long the last evaluation took
        self.seconds_total = 0.0  # and all of them (a TimeBudget's re-plan leaves them out of the pace)
        self.evaluated_epoch: int | None = None
        self._waiting_room = None  # a gloo group with a long timeout (see evaluate_on_main)

    def before_fit(self):
        "Start a fresh history."
        self.history, self.evaluated_epoch = [], None
        self.run = not stands_aside(self.learn)

    def after_epoch(self):
        "Evaluate on schedule, on the main process; the others wait for it."
        last = self.learn.epoch == self.learn.n_epoch - 1
        if (self.learn.epoch + 1) % self.every and not last:
            return
        result = self.evaluate_on_main()
        self.evaluated_epoch = self.learn.epoch  # on every rank, so a caller can decide alike
        if result is not None:
            self.learn.knn_top1 = result[0]
            row = dict(epoch=self.learn.epoch, step=optimizer_steps(self.learn), knn_top1=result[0], knn_top5=result[1])
            if self.linear_probe:
                self.learn.linear_top1 = row["linear_top1"] = self.probe_top1
            self.history.append(row)

    def evaluate_on_main(self) -> tuple[float, float] | None:
        """:meth:`evaluate` on the main process (``None`` elsewhere); call it on every process.

        The other processes wait in a gloo group whose timeout is :attr:`wait`, on the host,
        instead of in their next collective, whose timeout (10 minutes for NCCL) a large bank
        outlasts.
        """
        from accelerate.state import PartialState

        if self._waiting_room is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._waiting_room = dist.new_group(backend="gloo", timeout=self.wait)  # every rank, here, together
        result = self.evaluate() if PartialState().is_main_process else None
        if self._waiting_room is not None:
            dist.barrier(group=self._waiting_room)
        return result

    def evaluate(self) -> tuple[float, float]:
        """k-NN top-1 and top-5 (percent) of the current network on the two loaders."""
        from carp_fast.eval.features import extract_features
        from carp_fast.eval.knn import knn_accuracy

        start = time.perf_counter()
        backbone = getattr(getattr(self.learn.model, "module", self.learn.model), self.network).backbone
        device = next(backbone.parameters()).device
        # extract_features runs the backbone in eval mode and restores its mode itself.
        bank = extract_features(backbone, self.train_dl, device=device, progress=False)
        queries = extract_features(backbone, self.valid_dl, device=device, progress=False)
        k = min(self.k, len(bank.labels))  # a bank smaller than k (a small test folder) votes with all of it
        if k < self.k and not getattr(self, "_warned_k", False):
            warnings.warn(f"KNNMonitor: the bank has {k} images, fewer than k={self.k}; voting with k={k}", stacklevel=2)
            self._warned_k = True
        result = knn_accuracy(bank.features, bank.labels, queries.features, queries.labels, k=k, temperature=self.temperature)
        if self.linear_probe:  # the second protocol, on the same cached features
            from carp_fast.eval.linear import bank_probe

            self.probe_top1 = bank_probe(bank, queries, device=device).top1
        self.seconds = time.perf_counter() - start  # a TimeBudget reserves this much for the last one
        self.seconds_total += self.seconds
        return result.top1, result.top5
