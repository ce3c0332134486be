"""The MaSSL loss against a float64 reference written with plain loops, and its schedules."""

import math

import pytest
import torch

from carp_fast.massl.clipping import clip_per_parameter
from carp_fast.loss import BlockLogits
from carp_fast.massl.loss import MaSSLLoss, massl_block_loss
from carp_fast.massl.memory import Memory
from carp_fast.massl.temperature import teacher_temperature


def reference_loss(z, w, memory, partition, tau_s, tau_t):
    """Paper / official criterion.py, one number at a time.

    z [V_s, N, D] student and w [V_t, N, D] teacher embeddings, memory [K, D], partition [P, B].
    For every pair i != j, image n, block p: -sum_b softmax(w M_p / tau_t)_b log_softmax(z M_p / tau_s)_b;
    the mean over n and p, then over pairs.
    """
    pair_losses = []
    for i in range(z.shape[0]):
        for j in range(w.shape[0]):
            if i == j:
                continue
            terms = []
            for n in range(z.shape[1]):
                for block in partition.tolist():
                    s_logits = [torch.dot(z[i, n], memory[k]) / tau_s for k in block]
                    t_logits = [torch.dot(w[j, n], memory[k]).detach() / tau_t for k in block]
                    s_norm = torch.logsumexp(torch.stack(s_logits), 0)
                    t_norm = torch.logsumexp(torch.stack(t_logits), 0)
                    terms.append(-sum(torch.exp(t - t_norm) * (s - s_norm) for s, t in zip(s_logits, t_logits)))
            pair_losses.append(sum(terms) / len(terms))
    return sum(pair_losses) / len(pair_losses)


def _unit(*shape, seed):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("n_student,n_teacher", [(2, 2), (4, 2), (3, 1), (5, 2)])
@pytest.mark.parametrize("block_size", [1, 5, 12])  # 12 blocks; 2 blocks and 2 slots left out; one block
@pytest.mark.parametrize("n_images", [1, 3])
def test_loss_and_gradients_equal_the_reference(n_student, n_teacher, block_size, n_images):
    n_slots, dim, tau_s, tau_t = 12, 5, 0.1, 0.055
    memory = Memory(n_slots, dim, seed=1).double()
    memory.embeddings.copy_(_unit(n_slots, dim, seed=2))
    partition = torch.randperm(n_slots, generator=torch.Generator().manual_seed(3))
    partition = partition[: (n_slots // block_size) * block_size].view(-1, block_size)  # [P, B]
    z = _unit(n_student, n_images, dim, seed=4).requires_grad_(True)  # [V_s, N, D]
    w = _unit(n_teacher, n_images, dim, seed=5)  # [V_t, N, D]

    s = memory.block_logits(z.reshape(-1, dim), partition).view(n_student, n_images, *partition.shape)
    t = memory.block_logits(w.reshape(-1, dim), partition).view(n_teacher, n_images, *partition.shape)
    loss = massl_block_loss(s, t, student_temperature=tau_s, teacher_temperature=tau_t)
    (grad,) = torch.autograd.grad(loss, z)

    z_ref = z.detach().clone().requires_grad_(True)
    expected = reference_loss(z_ref, w, memory.embeddings, partition, tau_s, tau_t)
    (grad_ref,) = torch.autograd.grad(expected, z_ref)

    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-8, atol=1e-12)
    if block_size == 1:  # one slot per block: every distribution is certain, nothing to learn
        assert loss.item() == pytest.approx(0.0, abs=1e-12)


def test_teacher_gets_no_gradient_and_a_higher_teacher_temperature_changes_the_loss():
    s = torch.randn(3, 2, 2, 4, requires_grad=True)
    t = torch.randn(2, 2, 2, 4, requires_grad=True)
    loss = massl_block_loss(s, t, teacher_temperature=0.04)
    loss.backward()
    assert t.grad is None and s.grad is not None
    assert massl_block_loss(s, t, teacher_temperature=0.07).item() != pytest.approx(loss.item())


def test_loss_is_float32_under_bf16_autocast():
    torch.manual_seed(0)
    z, memory = torch.nn.functional.normalize(torch.randn(8, 16), dim=1), Memory(64, 16)
    partition = torch.randperm(64).view(4, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        s = memory.block_logits(z, partition).view(2, 4, 4, 16)  # [V, N, P, B]
        loss = massl_block_loss(s, s[:1], teacher_temperature=0.04)
    s_fp32 = memory.block_logits(z, partition).view(2, 4, 4, 16)
    assert s.dtype == torch.float32 and loss.dtype == torch.float32
    torch.testing.assert_close(s, s_fp32, rtol=1e-6, atol=1e-7)
    assert loss.item() == pytest.approx(massl_block_loss(s_fp32, s_fp32[:1], teacher_temperature=0.04).item(), rel=1e-6)


def test_loss_func_reads_its_temperature_and_keeps_the_last_value():
    s, t = torch.randn(3, 2, 2, 4), torch.randn(2, 2, 2, 4)
    loss_func = MaSSLLoss(student_temperature=0.1, teacher_temperature=0.06)
    value = loss_func(BlockLogits(s, t, torch.arange(8).view(2, 4)), torch.zeros(2))
    assert value.item() == pytest.approx(massl_block_loss(s, t, teacher_temperature=0.06).item())
    assert torch.equal(loss_func.last, value.detach())


@pytest.mark.parametrize(
    "student,teacher,kwargs,match",
    [
        (torch.randn(2, 2, 4), torch.randn(2, 2, 2, 4), {}, r"\[V, N, P, B\]"),
        (torch.randn(2, 2, 2, 4), torch.randn(2, 3, 2, 4), {}, "differ beyond the view dimension"),
        (torch.randn(1, 2, 2, 4), torch.randn(1, 2, 2, 4), {}, "at least one pair"),
        (torch.randn(2, 2, 2, 4), torch.randn(3, 2, 2, 4), {}, "V_t <= V_s"),
        (torch.randn(2, 2, 2, 4), torch.randn(2, 2, 2, 4), {"teacher_temperature": 0.0}, "temperatures must be > 0"),
    ],
)
def test_bad_input_is_a_clear_error(student, teacher, kwargs, match):
    with pytest.raises(ValueError, match=match):
        massl_block_loss(student, teacher, **kwargs)


@pytest.mark.parametrize(
    "epoch,expected", [(0, 0.04), (7.5, 0.0475), (15, 0.055), (29.999, 0.04 + 0.03 * 29.999 / 30), (30, 0.07), (800, 0.07)]
)
def test_teacher_temperature_warms_up_linearly_then_stays(epoch, expected):
    assert teacher_temperature(epoch) == pytest.approx(expected)


def test_teacher_temperature_without_warmup_is_the_end_value():
    assert teacher_temperature(0, 0.04, 0.07, warmup_epochs=0) == 0.07


@pytest.mark.parametrize("max_norm", [0.5, 3.0])
def test_per_parameter_clipping_equals_the_official_loop(max_norm):
    grads = [torch.randn(5, 3) * 4, torch.randn(7) * 0.01, torch.randn(2, 2, 2)]
    expected = []
    for g in grads:  # official utils.clip_gradients
        coef = max_norm / (g.norm(2) + 1e-6)
        expected.append(g * coef if coef < 1 else g.clone())
    clip_per_parameter(grads, max_norm)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e)
    assert all(g.norm() <= max_norm + 1e-5 for g in grads)
