"""carp_loss and random_partition against a reference written from the paper's formulas.

The reference below loops over views, images and blocks and computes every softmax, dot
product and average separately, in float64: it shares no code with carp_fast.loss.
"""

import math

import pytest
import torch

from carp_fast.loss import CARPLoss, carp_block_loss, carp_loss, random_partition


def reference_carp(student_logits, teacher_logits, partition):
    """(consistency, entropy) from paper eq. (4), one term at a time."""
    eps = torch.finfo(torch.float64).eps
    n_images = student_logits[0].shape[0]
    blocks = [list(map(int, row)) for row in partition]
    block_size = len(blocks[0])

    def probs(logits_row, block):
        values = [logits_row[k] for k in block]
        top = max(float(v.detach()) for v in values)
        exps = [torch.exp(v - top) for v in values]
        total = sum(exps)
        return [e / total for e in exps]

    pair_terms = []
    for i, s_view in enumerate(student_logits):
        for j, t_view in enumerate(teacher_logits):
            if i == j:
                continue
            for n in range(n_images):
                for block in blocks:
                    s = probs(s_view[n], block)
                    t = [x.detach() for x in probs(t_view[n], block)]
                    dot = sum(a * b for a, b in zip(s, t))
                    pair_terms.append(-torch.log(torch.clamp(dot, eps, 1 - eps)))
    consistency = sum(pair_terms) / len(pair_terms)

    block_terms = []
    for block in blocks:
        rows = [probs(v[n], block) for v in student_logits for n in range(n_images)]
        rows += [[x.detach() for x in probs(v[n], block)] for v in teacher_logits for n in range(n_images)]
        pbar = [sum(r[b] for r in rows) / len(rows) for b in range(block_size)]
        block_terms.append(math.log(block_size) + sum(p * torch.log(p) for p in pbar))
    entropy = sum(block_terms) / len(block_terms)
    return consistency, entropy


def make_logits(n_views, n_images, n_prototypes, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(n_images, n_prototypes, generator=g, dtype=torch.float64)).requires_grad_() for _ in range(n_views)]


CASES = {
    "multi-crop 8+2": dict(v_s=8, v_t=2, n=3, k=12, b=4),
    "two views 2+2": dict(v_s=2, v_t=2, n=4, k=12, b=3),
    "one block (B = K)": dict(v_s=4, v_t=2, n=3, k=10, b=10),
    "K not divisible by B": dict(v_s=3, v_t=2, n=2, k=11, b=4),
    "batch of 1": dict(v_s=4, v_t=2, n=1, k=8, b=2),
    "block of 1": dict(v_s=2, v_t=2, n=2, k=5, b=1),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_carp_loss_matches_reference_values_and_gradients(case):
    student = make_logits(case["v_s"], case["n"], case["k"], seed=1)
    teacher = make_logits(case["v_t"], case["n"], case["k"], seed=2)
    partition = random_partition(case["k"], case["b"], generator=torch.Generator().manual_seed(3))

    parts = carp_loss(student, teacher, partition)
    ref_consistency, ref_entropy = reference_carp(student, teacher, partition)

    assert parts.consistency.dtype == torch.float64
    torch.testing.assert_close(parts.consistency, ref_consistency, rtol=0, atol=1e-9)
    torch.testing.assert_close(parts.entropy, ref_entropy, rtol=0, atol=1e-9)
    torch.testing.assert_close(parts.total, ref_consistency + ref_entropy, rtol=0, atol=1e-9)

    grads = torch.autograd.grad(parts.total, student)
    ref_grads = torch.autograd.grad(ref_consistency + ref_entropy, student)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=0, atol=1e-9)
    # Prototypes left out of the partition (K mod B) get no gradient.
    left_out = sorted(set(range(case["k"])) - set(partition.flatten().tolist()))
    for g in grads:
        assert torch.all(g[:, left_out] == 0)


def test_teacher_gets_no_gradient():
    student = make_logits(4, 3, 8, seed=1)
    teacher = make_logits(2, 3, 8, seed=2)
    parts = carp_loss(student, teacher, random_partition(8, 4))
    parts.total.backward()
    assert all(t.grad is None for t in teacher)
    assert all(s.grad is not None and s.grad.abs().sum() > 0 for s in student)


def test_loss_of_perfect_agreement_and_uniform_usage():
    # Each image picks a different prototype in every block with near-certainty, in all
    # views: consistency -> 0 and, as images spread evenly, entropy -> 0 as well.
    k, b = 8, 4
    partition = torch.arange(k).view(2, b)
    logits = torch.full((b, k), -50.0, dtype=torch.float64)
    for n in range(b):
        logits[n, n] = logits[n, b + n] = 50.0  # image n -> prototype n of each block
    parts = carp_loss([logits] * 4, [logits] * 2, partition)
    assert parts.consistency < 1e-9 and abs(parts.entropy) < 1e-9
    # All images on one prototype per block: the entropy term is log(B), collapse.
    collapsed = torch.full((b, k), -50.0, dtype=torch.float64)
    collapsed[:, 0] = collapsed[:, b] = 50.0
    parts = carp_loss([collapsed] * 2, [collapsed] * 2, partition)
    assert parts.entropy == pytest.approx(math.log(b), abs=1e-9)


def test_block_loss_equals_loss_on_gathered_logits():
    student = make_logits(6, 2, 16, seed=5)
    teacher = make_logits(2, 2, 16, seed=6)
    partition = random_partition(16, 4, generator=torch.Generator().manual_seed(0))
    s_blocks = torch.stack([x[:, partition] for x in student])  # [V, N, P, B] by advanced indexing
    t_blocks = torch.stack([x[:, partition] for x in teacher])
    torch.testing.assert_close(carp_block_loss(s_blocks, t_blocks).total, carp_loss(student, teacher, partition).total)


def test_half_precision_logits_compute_in_float32():
    student = [x.detach().bfloat16() for x in make_logits(2, 3, 8, seed=1)]
    teacher = [x.detach().bfloat16() for x in make_logits(2, 3, 8, seed=2)]
    parts = carp_loss(student, teacher, random_partition(8, 4))
    assert parts.total.dtype == torch.float32 and torch.isfinite(parts.total)


def test_carp_loss_callable_keeps_detached_parts():
    from carp_fast.loss import BlockLogits

    s = torch.randn(4, 2, 3, 5, requires_grad=True)
    t = torch.randn(2, 2, 3, 5)
    loss_func = CARPLoss()
    total = loss_func(BlockLogits(s, t, torch.arange(15).view(3, 5)), torch.zeros(2))
    assert total.requires_grad and not loss_func.parts.total.requires_grad
    torch.testing.assert_close(loss_func.parts.total, total.detach())


# random_partition ------------------------------------------------------------------------


@pytest.mark.parametrize("k,b", [(12, 4), (11, 4), (7, 7), (5, 1), (1, 1), (65536, 512)])
def test_random_partition_is_a_partition(k, b):
    part = random_partition(k, b, generator=torch.Generator().manual_seed(0))
    assert part.shape == (k // b, b) and part.dtype == torch.int64
    flat = part.flatten().tolist()
    assert len(set(flat)) == len(flat) and all(0 <= i < k for i in flat)
    if k % b == 0:
        assert sorted(flat) == list(range(k))


def test_random_partition_reproducible_and_fresh():
    a = random_partition(64, 8, generator=torch.Generator().manual_seed(7))
    b = random_partition(64, 8, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    c, d = random_partition(64, 8, generator=g), random_partition(64, 8, generator=g)
    assert torch.equal(a, b) and torch.equal(a, c) and not torch.equal(c, d)


def test_random_partition_is_uniform():
    # Where prototype 0 lands among K = 8 positions over 8,000 draws: a chi-square test
    # (7 degrees of freedom; 24.3 is the 0.1 % critical value).
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(8)
    for _ in range(8000):
        counts[(random_partition(8, 2, generator=g).flatten() == 0).nonzero()] += 1
    chi2 = ((counts - 1000) ** 2 / 1000).sum()
    assert chi2 < 24.3


# bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "k,b,match",
    [(8, 0, "block_size"), (8, 9, "block_size"), (0, 1, "n_prototypes"), (8, 2.0, "block_size")],
)
def test_random_partition_rejects_bad_sizes(k, b, match):
    with pytest.raises(ValueError, match=match):
        random_partition(k, b)


def test_carp_loss_rejects_bad_input():
    s = [torch.randn(2, 8) for _ in range(2)]
    t = [torch.randn(2, 8) for _ in range(2)]
    part = random_partition(8, 4)
    with pytest.raises(ValueError, match="student_logits\\[1\\]"):
        carp_loss([s[0], torch.randn(3, 8)], t, part)
    with pytest.raises(ValueError, match="teacher_logits\\[0\\]"):
        carp_loss(s, [torch.randn(2, 8, 1), t[1]], part)
    with pytest.raises(ValueError, match="teacher_logits has 3 views"):
        carp_loss(s, t + [t[0]], part)
    with pytest.raises(ValueError, match="floating-point"):
        carp_loss([torch.ones(2, 8, dtype=torch.long)] * 2, t, part)
    with pytest.raises(ValueError, match="partition indices"):
        carp_loss(s, t, torch.tensor([[0, 1], [2, 8]]))
    with pytest.raises(ValueError, match="distinct"):
        carp_loss(s, t, torch.tensor([[0, 1], [1, 2]]))
    with pytest.raises(ValueError, match="partition must be"):
        carp_loss(s, t, torch.arange(8))
    with pytest.raises(ValueError, match="teacher_logits views are"):
        carp_loss(s, [torch.randn(2, 6)] * 2, random_partition(6, 3))
    with pytest.raises(ValueError, match="sequence"):
        carp_loss(torch.randn(2, 8), t, part)
