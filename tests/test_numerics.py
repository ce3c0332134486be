"""Numerics that must agree with the official CARP and MaSSL code (issue 19).

Each expected value is written here from the official formulas (github sthalles/carp
``modules/carp_loss.py``, ``main_carp.py``, ``utils.cosine_scheduler``; sthalles/MaSSL
``main_massl.py``), not read from carp_fast.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from fastai.callback.core import Callback

from carp_fast.loss import carp_block_loss
from carp_fast.carp import CARPStudentTeacher
from carp_fast.networks import Prototypes


def official_block_loss(student, teacher, eps):
    """CARP's loss as the official code computes it, in the inputs' dtype: consistency
    ``-log clamp(<s_i, t_j>, eps, 1-eps)`` over pairs i != j, entropy
    ``log B + sum p log clamp(p, eps, 1-eps)`` with p the mean of all views' probabilities."""
    s, t = student.softmax(-1), teacher.detach().softmax(-1)  # [V, N, P, B]
    terms = [
        -(s[i] * t[j]).sum(-1).clamp(eps, 1 - eps).log().mean()
        for i in range(s.shape[0]) for j in range(t.shape[0]) if i != j
    ]
    consistency = sum(terms) / len(terms)
    p = torch.cat([s, t]).mean(dim=(0, 1))  # [P, B]
    entropy = (math.log(p.shape[-1]) + (p * p.clamp(eps, 1 - eps).log()).sum(-1)).mean()
    return consistency + entropy


def far_below_logits(seed=0):
    """Block logits ``[V, N, P, B]`` of scale 4 with prototype 0 of every block 250 below the
    rest in every row: its mean probability underflows to exactly 0 in float32."""
    g = torch.Generator().manual_seed(seed)
    student = 4 * torch.randn(4, 8, 6, 16, generator=g)
    teacher = 4 * torch.randn(2, 8, 6, 16, generator=g)
    student[..., 0] -= 250
    teacher[..., 0] -= 250
    return student.requires_grad_(), teacher


def test_entropy_gradient_is_finite_where_a_prototype_gets_no_probability():
    student, teacher = far_below_logits()
    eps = torch.finfo(torch.float32).eps
    pbar = torch.cat([student.softmax(-1), teacher.softmax(-1)]).mean(dim=(0, 1))
    assert (pbar[:, 0] == 0).all()  # the case: p exactly 0 in float32

    loss = carp_block_loss(student, teacher).total
    (grad,) = torch.autograd.grad(loss, student)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()

    reference = official_block_loss(student, teacher, eps)
    (ref_grad,) = torch.autograd.grad(reference, student)
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-5, atol=1e-7)


def test_entropy_gradient_equals_the_clamp_form_above_eps():
    g = torch.Generator().manual_seed(1)
    student = (3 * torch.randn(4, 5, 3, 8, generator=g, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(2, 5, 3, 8, generator=g, dtype=torch.float64)
    eps = torch.finfo(torch.float64).eps
    (grad,) = torch.autograd.grad(carp_block_loss(student, teacher).total, student)
    (ref_grad,) = torch.autograd.grad(official_block_loss(student, teacher, eps), student)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-14)


def test_block_logits_are_float32_under_bf16_autocast():
    torch.manual_seed(0)
    prototypes = Prototypes(dim=32, n_prototypes=64)
    z = torch.randn(10, 32)
    partition = torch.randperm(64).view(4, 16)
    # Written from the definition: z . w_k / |w_k| for each prototype of each block, in float64.
    w = prototypes.weight.detach().double()
    expected = torch.stack([(z.double() @ (w[block] / w[block].norm(dim=1, keepdim=True)).t()) for block in partition], dim=1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = prototypes.block_logits(z, partition)
        everything = prototypes(z)
    assert logits.dtype == torch.float32 and everything.dtype == torch.float32
    torch.testing.assert_close(logits.double(), expected, rtol=1e-5, atol=1e-5)  # bf16 is off by ~1e-2


def test_student_teacher_returns_float32_block_logits_under_bf16_autocast():
    model = CARPStudentTeacher(arch="resnet18_small", n_prototypes=32, block_size=8, hidden_dim=16, embed_dim=8)
    crops = [torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16), torch.randn(4, 3, 8, 8)]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(*crops)
    assert out.student.dtype == torch.float32 and out.teacher.dtype == torch.float32


def test_massl_trains_in_fp16_through_fastai(tiny_dls):
    from carp_fast.massl import MaSSLConfig, massl_learner

    config = MaSSLConfig(
        arch="resnet18_small", memory_size=64, block_size=16, hidden_dim=32, embed_dim=16,
        batch_size=8, global_batch=8, precision="fp16", log_every=2,
    )
    losses = Losses()
    learn = massl_learner(tiny_dls, config, cbs=[losses], progress=False)
    learn.fit(1)
    assert learn.mixed_precision.grad_scaler.is_enabled()
    assert len(losses.values) == 4 and all(math.isfinite(x) for x in losses.values)


class Losses(Callback):
    def before_fit(self):
        self.values = []

    def after_batch(self):
        self.values.append(float(self.learn.loss))


class StepLRs(Callback):
    """The lr and teacher momentum of every optimizer step (only stepping micro-batches reach it)."""

    order = 100

    def before_fit(self):
        self.lrs, self.momenta = [], []

    def before_step(self):
        self.lrs.append(self.learn.opt.hypers[0]["lr"])

    def after_step(self):
        self.momenta.append(self.learn.teacher_momentum)


def official_cosine_schedule(base, final, epochs, niter_per_ep, warmup_epochs=0):
    """``utils.cosine_scheduler`` of the official code (DINO's): one value per micro-batch."""
    warmup_iters = warmup_epochs * niter_per_ep
    warmup = np.linspace(0, base, warmup_iters) if warmup_epochs > 0 else np.array([])
    iters = np.arange(epochs * niter_per_ep - warmup_iters)
    return np.concatenate([warmup, final + 0.5 * (base - final) * (1 + np.cos(np.pi * iters / len(iters)))])


def test_lr_and_momentum_with_accumulation_are_read_at_the_stepping_micro_batch(tiny_dls, tiny_config):
    # 4 micro-batches of 8 per epoch, 2 per step, 2 epochs: the official loop steps at the
    # micro-batches it = 1, 3, 5, 7 and reads lr_schedule[it], momentum_schedule[it].
    tiny_config.base_lr, tiny_config.final_lr, tiny_config.global_batch = 0.4, 0.004, 16
    from carp_fast.carp import carp_learner

    spy = StepLRs()
    learn = carp_learner(tiny_dls, tiny_config, cbs=[spy], progress=False)
    learn.fit(2)
    peak = 0.4 * 16 / 256
    lr_schedule = official_cosine_schedule(peak, 0.004, epochs=2, niter_per_ep=4)
    momentum_schedule = official_cosine_schedule(tiny_config.teacher_momentum, 1.0, epochs=2, niter_per_ep=4)
    stepping = [1, 3, 5, 7]
    assert spy.lrs == pytest.approx(lr_schedule[stepping].tolist())
    assert spy.momenta == pytest.approx(momentum_schedule[stepping].tolist())


def test_massl_lr_reaches_the_peak_on_the_last_warmup_iteration(tiny_dls):
    from carp_fast.massl import MaSSLConfig, massl_learner

    config = MaSSLConfig(
        arch="resnet18_small", memory_size=64, block_size=16, hidden_dim=32, embed_dim=16,
        batch_size=8, global_batch=8, precision="fp32", base_lr=0.01, final_lr=1e-4, warmup_epochs=1,
    )
    spy = StepLRs()
    learn = massl_learner(tiny_dls, config, cbs=[spy], progress=False)
    learn.fit(3)
    peak = 0.01 * 8 / 256
    expected = official_cosine_schedule(peak, 1e-4, epochs=3, niter_per_ep=4, warmup_epochs=1)
    assert spy.lrs[3] == pytest.approx(peak)  # np.linspace(0, peak, W)[-1]
    assert spy.lrs == pytest.approx(expected.tolist())
