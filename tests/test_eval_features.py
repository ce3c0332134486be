"""Feature extraction over any (images, labels) iterable, and its disk cache."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from carp_fast.eval.features import cache_key, cached_features, extract_features


class _Pool(nn.Module):
    """A tiny 'backbone' with BatchNorm, so eval mode matters."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.bn(self.conv(x)).mean(dim=(2, 3))  # [N, 4]


@pytest.fixture
def loader():
    g = torch.Generator().manual_seed(0)
    images, labels = torch.randn(10, 3, 8, 8, generator=g), torch.randint(0, 3, (10,), generator=g)
    return DataLoader(TensorDataset(images, labels), batch_size=4)  # batches of 4, 4, 2


@pytest.mark.parametrize("progress", [False, True])
def test_extract_matches_direct_forward(loader, progress):
    torch.manual_seed(0)
    model = _Pool()
    model.bn.running_mean.fill_(0.5)
    result = extract_features(model, loader, device="cpu", progress=progress)
    images, labels = loader.dataset.tensors
    model.eval()
    with torch.no_grad():
        want = model(images)
    assert result.features.shape == (10, 4) and result.features.dtype == torch.float32
    torch.testing.assert_close(result.features, want)
    assert torch.equal(result.labels, labels) and result.labels.dtype == torch.int64


def test_features_can_train_a_probe_and_model_mode_is_restored(loader):
    model = _Pool().train()
    result = extract_features(model, loader, device="cpu", progress=False)
    assert model.training  # eval during extraction only
    assert not result.features.is_inference()
    probe = nn.Linear(4, 3)
    nn.functional.cross_entropy(probe(result.features), result.labels).backward()
    assert probe.weight.grad is not None
    for p in model.parameters():  # still trainable parameters
        assert not p.is_inference()


def test_extract_works_on_a_generator(loader):
    result = extract_features(_Pool(), (batch for batch in loader), device="cpu", progress=False)
    assert len(result.labels) == 10


def test_extract_rejects_non_feature_output(loader):
    with pytest.raises(ValueError, match=r"features \[N, D\]"):
        extract_features(nn.Identity(), loader, device="cpu", progress=False)
    model = _Pool().train()
    with pytest.raises(ValueError, match="batches is empty"):
        extract_features(model, [], device="cpu", progress=False)
    assert model.training  # restored when the extraction fails too


def test_cache_hit_skips_model_and_data(tmp_path, loader):
    checkpoint = tmp_path / "c.pth"
    checkpoint.write_bytes(b"weights")
    calls = []

    def make_model():
        calls.append("model")
        return _Pool()

    def make_batches():
        calls.append("data")
        return loader

    kwargs = dict(checkpoint=checkpoint, split="train", settings={"size": 8},
                  cache_dir=tmp_path / "cache", device="cpu", progress=False)  # fmt: skip
    first = cached_features(make_model, make_batches, **kwargs)
    second = cached_features(make_model, make_batches, **kwargs)
    assert calls == ["model", "data"]  # the second call read the cache
    torch.testing.assert_close(first.features, second.features)
    assert len(list((tmp_path / "cache").glob("train-*.pt"))) == 1

    cached_features(make_model, make_batches, **{**kwargs, "settings": {"size": 16}})
    assert len(calls) == 4  # other settings: another entry
    cached_features(make_model, make_batches, **{**kwargs, "cache_dir": None})
    assert len(calls) == 6  # cache disabled


def test_cache_key_depends_on_checkpoint_mtime_split_and_settings(tmp_path):
    checkpoint = tmp_path / "c.pth"
    checkpoint.write_bytes(b"weights")
    key = cache_key(checkpoint, "train", {"which": "teacher"})
    assert key == cache_key(checkpoint, "train", {"which": "teacher"})
    assert key != cache_key(checkpoint, "test", {"which": "teacher"})
    assert key != cache_key(checkpoint, "train", {"which": "student"})
    stat = os.stat(checkpoint)
    os.utime(checkpoint, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert key != cache_key(checkpoint, "train", {"which": "teacher"})  # retrained checkpoint
