"""Linear probe and few-shot protocol on frozen features."""

from __future__ import annotations

import pytest
import torch

from carp_fast.eval.fewshot import few_shot_evaluate, sample_few_shot
from carp_fast.eval.linear import linear_probe


def _separable(n, dim, num_classes, seed, scale=1.0):
    """Labels = argmax of a fixed linear map: linearly separable by construction."""
    g = torch.Generator().manual_seed(seed)
    weights = torch.randn(dim, num_classes, generator=torch.Generator().manual_seed(99))
    x = torch.randn(n, dim, generator=g) * scale + 5.0  # offset and scale: standardised away
    return x, ((x - 5.0) @ weights).argmax(1)


def test_linear_probe_separable():
    x, y = _separable(3000, 32, 5, seed=0, scale=100.0)
    xt, yt = _separable(1000, 32, 5, seed=1, scale=100.0)
    result = linear_probe(x, y, xt, yt, epochs=30)
    assert result.top1 > 93.0 and result.top5 == 100.0
    assert result.settings["epochs"] == 30 and result.settings["num_classes"] == 5


def test_linear_probe_learns_something_beyond_chance():
    # Guard against a probe that ignores its input: shuffled labels must do worse.
    x, y = _separable(2000, 32, 5, seed=0)
    xt, yt = _separable(500, 32, 5, seed=1)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    assert linear_probe(x, shuffled, xt, yt, epochs=10).top1 < 40.0


def test_linear_probe_deterministic():
    x, y = _separable(500, 8, 3, seed=0)
    a = linear_probe(x, y, x, y, epochs=3, seed=7)
    assert a == linear_probe(x, y, x, y, epochs=3, seed=7)


def test_linear_probe_errors():
    x, y = _separable(50, 8, 3, seed=0)
    with pytest.raises(ValueError, match="train_labels must be"):
        linear_probe(x, y[:-1], x, y)
    with pytest.raises(ValueError, match="share D"):
        linear_probe(x, y, x[:, :4], y)
    with pytest.raises(ValueError, match="must be positive"):
        linear_probe(x, y, x, y, epochs=0)


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [0, 1])
def test_sampler_draws_exactly_n_per_class(n, seed):
    labels = torch.tensor([0] * 20 + [1] * 16 + [3] * 30)  # class 2 absent, uneven sizes
    index = sample_few_shot(labels, n, seed=seed)
    assert len(index) == len(set(index.tolist())) == 3 * n  # no repeats
    counts = torch.bincount(labels[index], minlength=4)
    assert counts.tolist() == [n, n, 0, n]


def test_sampler_seeds_differ_and_repeat():
    labels = torch.arange(10).repeat(20)
    assert torch.equal(sample_few_shot(labels, 4, seed=3), sample_few_shot(labels, 4, seed=3))
    assert not torch.equal(sample_few_shot(labels, 4, seed=3), sample_few_shot(labels, 4, seed=4))


def test_sampler_errors():
    labels = torch.tensor([0, 0, 1])
    with pytest.raises(ValueError, match="class 1 has 1 items, fewer than n = 2"):
        sample_few_shot(labels, 2)
    with pytest.raises(ValueError, match="at least 1"):
        sample_few_shot(labels, 0)


def test_few_shot_evaluate_on_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.randn(4, 16, generator=g) * 4
    y, yt = torch.arange(4).repeat(30), torch.arange(4).repeat(25)
    x = centres[y] + torch.randn(len(y), 16, generator=g)
    xt = centres[yt] + torch.randn(len(yt), 16, generator=g)
    results = few_shot_evaluate(x, y, xt, yt, shots=(1, 8), seeds=3, epochs=30)
    assert set(results) == {1, 8}
    for n, r in results.items():
        assert r.n == n and len(r.runs) == 3
        assert r.mean == pytest.approx(sum(r.runs) / 3)
        assert r.std == pytest.approx(torch.tensor(r.runs).std(unbiased=False).item())
    assert results[8].mean > 95.0
