"""The training step of the paper's official loop (appendix E), written plainly: the reference
that ``bench_train.py`` times carp_fast against, and that ``tests/test_bench_train.py`` checks
computes the same loss and weights as carp_fast's Learner.

fp16 autocast with a grad scaler on CUDA (fp32 on the CPU by default), full ``[N, K]``
logits gathered per view with ``logits[:, perm].split(B)``, a per-parameter LARS loop, a
per-parameter ``p.data = ...`` EMA loop, NCHW, no compile.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from carp_fast.carp import CARPStudentTeacher

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def autocast(device: torch.device, precision: str):
    """``torch.autocast`` for ``precision`` ("fp32": no autocast)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


class LoopLARS(torch.optim.Optimizer):
    """LARS written per parameter, as the official CARP / DINO / BYOL code has it.

    Same update as :class:`carp_fast.lars.LARS` (so both give the same parameters), one
    Python iteration and several small kernels per parameter.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 1e-6, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                dp = p.grad
                if p.ndim > 1:  # no weight decay and no trust ratio for biases and BatchNorm
                    dp = dp.add(p, alpha=g["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    q = torch.where(param_norm > 0.0, torch.where(update_norm > 0, g["eta"] * param_norm / update_norm, one), one)
                    dp = dp.mul(q)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(g["momentum"]).add_(dp)
                p.add_(mu, alpha=-g["lr"])


def blocks_by_gather(logits: Tensor, perm: Tensor, block_size: int) -> Tensor:
    """Paper appendix E ``get_logits_gr``: ``[N, K] -> [P, N, B]`` probabilities.

    The softmax runs in fp32, as CUDA fp16 autocast runs it."""
    blocks = logits[:, perm].split(block_size, dim=1)  # P x [N, B]; the gather copies [N, K]
    return F.softmax(torch.stack(blocks, dim=0).float(), dim=-1)  # [P, N, B]


def baseline_loss(preds: Sequence[Tensor], targets: Sequence[Tensor]) -> Tensor:
    """Paper appendix E ``loss_fn`` for V_s student and V_t teacher views.

    Args:
        preds: V_s student probabilities ``[P, N, B]``; targets: V_t teacher ones (detached).

    The appendix sums its two (i, j) pairs and writes ``log(K)``; here the pairs are
    averaged and the constant is ``log(B)``, the objective of paper eq. (4), so that
    the two implementations compute one number. ``clamp`` guards the log as the library does.
    """
    eps = torch.finfo(torch.float32).eps
    pairs = [(i, j) for i in range(len(preds)) for j in range(len(targets)) if i != j]
    consistency = sum(-torch.log(torch.einsum("knc,knc->kn", preds[i], targets[j]).clamp(eps, 1 - eps)).mean()
                      for i, j in pairs) / len(pairs)
    probs = torch.cat([torch.cat(list(preds), dim=1), torch.cat(list(targets), dim=1)], dim=1)  # [P, V*N, B]
    pbar = probs.mean(dim=1)  # [P, B]
    entropy = (math.log(pbar.shape[-1]) + (pbar * torch.log(pbar)).sum(dim=-1)).mean()
    return consistency + entropy


class PaperStep:
    """The plain step of the paper's official loop; see the module docstring.

    Args:
        model: its own :class:`CARPStudentTeacher`.
        precision: ``"fp16"`` (with a grad scaler) on CUDA as the official code; on the CPU
            ``"fp32"`` (default) or ``"bf16"``.
        lr, weight_decay, teacher_momentum: constant (their values do not change the cost of
            a step); set ``self.lr`` / ``self.teacher_momentum`` between calls to follow a schedule.
    """

    def __init__(self, model: CARPStudentTeacher, precision: str, lr: float = 0.05, weight_decay: float = 1e-6,
                 teacher_momentum: float = 0.996):
        self.model, self.precision = model, precision
        self.device = next(model.parameters()).device
        self.opt = LoopLARS(model.student.parameters(), lr=lr, weight_decay=weight_decay)
        self.teacher_momentum = teacher_momentum
        # fp16 needs loss scaling; GradScaler.step reads found_inf on the host (a sync per step).
        self.scaler = torch.amp.GradScaler(self.device.type) if precision == "fp16" else None

    def __call__(self, crops: Sequence[Tensor]) -> Tensor:
        model, n_student, n_teacher = self.model, len(crops), self.model.global_crops
        with autocast(self.device, self.precision):
            z = model.student.embed(crops)  # [V_s*N, D]
            with torch.no_grad():
                w = model.teacher.embed(crops[:n_teacher])  # [V_t*N, D]
            partition = model.partitioner(device=z.device)  # [P, B]
            perm, block_size = partition.flatten(), partition.shape[1]
            s_logits = model.student.prototypes(z).chunk(n_student)  # V_s x [N, K]
            preds = [blocks_by_gather(x, perm, block_size) for x in s_logits]  # V_s x [P, N, B]
            with torch.no_grad():
                t_logits = model.teacher.prototypes(w).chunk(n_teacher)  # V_t x [N, K]
                targets = [blocks_by_gather(x, perm, block_size) for x in t_logits]
            loss = baseline_loss(preds, targets)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.opt)
            self.scaler.update()
        else:
            loss.backward()
            self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            m = self.teacher_momentum
            for pt, ps in zip(model.teacher.parameters(), model.student.parameters()):
                pt.data = pt.data * m + ps.data * (1 - m)
        return loss.detach()
