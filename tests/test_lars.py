"""LARS against a plain per-tensor implementation of the update written here."""

import pytest
import torch

from carp_fast.lars import LARS


def reference_lars_steps(params, grads_per_step, lr, momentum, weight_decay, eta):
    """The official LARS (DINO/BYOL): >1-d tensors get weight decay and the trust ratio."""
    params = [p.clone() for p in params]
    bufs = [None] * len(params)
    for grads in grads_per_step:
        for i, (p, g) in enumerate(zip(params, grads)):
            d = g.clone()
            if p.ndim > 1:
                d = d + weight_decay * p
                p_norm, d_norm = torch.norm(p), torch.norm(d)
                if p_norm > 0 and d_norm > 0:
                    d = d * (eta * p_norm / d_norm)
            bufs[i] = d if bufs[i] is None else momentum * bufs[i] + d
            params[i] = p - lr * bufs[i]
    return params


def test_lars_matches_reference_over_three_steps():
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (4,), (2, 3, 3, 3), (5,), (3, 3)]
    init = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    init[4] = torch.zeros(3, 3, dtype=torch.float64)  # zero weight: trust ratio falls back to 1
    grads = [[torch.randn(s, generator=g, dtype=torch.float64) for s in shapes] for _ in range(3)]
    params = [torch.nn.Parameter(p.clone()) for p in init]
    opt = LARS(params, lr=0.5, momentum=0.9, weight_decay=1e-2, eta=0.02)
    for step in grads:
        for p, grad in zip(params, step):
            p.grad = grad.clone()
        opt.step()
    expected = reference_lars_steps(init, grads, lr=0.5, momentum=0.9, weight_decay=1e-2, eta=0.02)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-12)


def test_one_dimensional_parameters_are_plain_sgd_with_momentum():
    bias = torch.nn.Parameter(torch.ones(3))
    opt = LARS([bias], lr=0.1, momentum=0.9, weight_decay=0.5, eta=0.001)
    bias.grad = torch.full((3,), 2.0)
    opt.step()
    torch.testing.assert_close(bias.detach(), torch.full((3,), 1 - 0.1 * 2.0))


def test_lars_rejects_bad_hyperparameters():
    p = [torch.nn.Parameter(torch.ones(2, 2))]
    with pytest.raises(ValueError, match="lr"):
        LARS(p, lr=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        LARS(p, momentum=1.5)


def test_fastai_drives_lr_and_weight_decay_hypers():
    from carp_fast.carp import CARPConfig, opt_func

    p = torch.nn.Parameter(torch.ones(2, 2))
    opt = opt_func(CARPConfig())([p], lr=0.3)
    opt.set_hyper("lr", 0.01)
    opt.set_hyper("wd", 0.5)
    group = opt.opt.param_groups[0]
    assert isinstance(opt.opt, LARS) and group["lr"] == 0.01 and group["weight_decay"] == 0.5
    assert group["eta"] == 0.001 and group["momentum"] == 0.9
