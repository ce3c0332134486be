"""CUDA paths of the evaluation suite: same answers as on the CPU."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from carp_fast.backbones import build_backbone
from carp_fast.eval.features import extract_features
from carp_fast.eval.knn import knn_accuracy, knn_classify

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


def test_knn_on_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    train, labels = torch.randn(5000, 64, generator=g), torch.randint(0, 10, (5000,), generator=g)
    test = torch.randn(300, 64, generator=g)
    cpu = knn_classify(train, labels, test, k=20, device="cpu")
    cuda = knn_classify(train, labels, test, k=20, device="cuda")
    assert cuda.device == test.device  # returned where the test features live
    torch.testing.assert_close(cuda, cpu, rtol=1e-4, atol=1e-4)
    test_labels = torch.randint(0, 10, (300,), generator=g)
    assert knn_accuracy(train, labels, test, test_labels, device="cuda") == knn_accuracy(
        train, labels, test, test_labels, device="cpu"
    )


def test_bf16_extraction_close_to_fp32():
    torch.manual_seed(0)
    model = build_backbone("resnet18_small")
    images = torch.randn(32, 3, 28, 28)
    loader = DataLoader(TensorDataset(images, torch.zeros(32, dtype=torch.long)), batch_size=8)
    fp32 = extract_features(model, loader, device="cuda", amp=False, progress=False)
    bf16 = extract_features(model, loader, device="cuda", amp=True, progress=False)
    cosine = torch.nn.functional.cosine_similarity(fp32.features, bf16.features, dim=1)
    assert fp32.features.device.type == "cpu" and cosine.min() > 0.99


def test_linear_grid_on_cuda_matches_cpu():
    from carp_fast.eval.linear_grid import Setting, linear_grid

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g)
    batches = lambda epoch: [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]  # noqa: E731
    grid = [Setting(lr, 1e-6, opt) for lr in (0.01, 0.1) for opt in ("sgd", "lars")]
    cpu = linear_grid(batches, x, y, num_classes=4, grid=grid, epochs=3, device="cpu")
    cuda = linear_grid(batches, x, y, num_classes=4, grid=grid, epochs=3, device="cuda")
    torch.testing.assert_close(cuda.weight, cpu.weight, rtol=1e-3, atol=1e-5)


def test_multiscale_on_cuda_matches_cpu():
    from carp_fast.eval.retrieval import MultiScale

    torch.manual_seed(0)
    model = MultiScale(build_backbone("resnet18_small").eval())
    images = torch.randn(1, 3, 48, 80)
    with torch.no_grad():
        cpu = model(images)
        cuda = model.cuda()(images.cuda()).cpu()
    # cuDNN may convolve in TF32: compare directions, not digits
    assert torch.nn.functional.cosine_similarity(cuda, cpu).min() > 0.999
