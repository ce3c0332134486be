"""The raw-pixel k-NN baseline against a k-NN written here from DINO's formula."""

import torch
from torch.utils.data import DataLoader, TensorDataset

from carp_fast.eval.pixels import raw_pixel_knn


def reference_knn_top1(bank_x, bank_y, query_x, query_y, k, temperature, n_classes):
    """Cosine similarity of flattened pixels, k nearest, votes exp(sim / T) per class."""
    bank = torch.nn.functional.normalize(bank_x.flatten(1).double(), dim=1)
    query = torch.nn.functional.normalize(query_x.flatten(1).double(), dim=1)
    correct = 0
    for q, y in zip(query, query_y):
        sims = bank @ q
        top = sims.topk(k)
        votes = torch.zeros(n_classes, dtype=torch.float64)
        for s, i in zip(top.values, top.indices):
            votes[bank_y[i]] += torch.exp(s / temperature)
        correct += int(votes.argmax() == y)
    return 100.0 * correct / len(query_y)


def test_raw_pixel_knn_matches_an_independent_vote():
    g = torch.Generator().manual_seed(0)
    # Four classes, each a noisy copy of its own 3x8x8 prototype image: pixels carry the class.
    prototypes = torch.randn(4, 3, 8, 8, generator=g)
    bank_y, query_y = torch.randint(0, 4, (60,), generator=g), torch.randint(0, 4, (25,), generator=g)
    bank_x = prototypes[bank_y] + 4.0 * torch.randn(60, 3, 8, 8, generator=g)
    query_x = prototypes[query_y] + 4.0 * torch.randn(25, 3, 8, 8, generator=g)
    loaders = [DataLoader(TensorDataset(x, y), batch_size=16) for x, y in ((bank_x, bank_y), (query_x, query_y))]

    result = raw_pixel_knn(*loaders, k=5, temperature=0.07)
    expected = reference_knn_top1(bank_x, bank_y, query_x, query_y, k=5, temperature=0.07, n_classes=4)
    assert abs(result.top1 - expected) < 1e-9
    assert 35 < expected < 100  # the data are neither trivial nor hopeless: the check can fail
