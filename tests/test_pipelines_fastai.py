"""fastai adapter: DataLoaders over our loaders, Learner.fit, one_batch, show_batch."""

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pytest
import torch
from torch import nn

from fastai.learner import Learner
from carp_fast.pipelines import ArraySource, MultiCropConfig, crop_dataloaders, eval_loader, pretrain_loader

CROPS = MultiCropConfig(global_size=16, local_size=8, local_crops=2)


class CropsModel(nn.Module):
    """Takes the crops as separate arguments (fastai passes xb = all but the labels)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)
        self.calls = []

    def forward(self, *crops):
        self.calls.append([tuple(c.shape) for c in crops])
        return sum(self.lin(c.mean((2, 3))) for c in crops)


@pytest.fixture(scope="module")
def source():
    rng = np.random.default_rng(0)
    return ArraySource(rng.integers(0, 256, (24, 20, 20), dtype=np.uint8), np.arange(24) % 4)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_learner_fit_runs_over_the_loaders(source, backend):
    train = pretrain_loader(source, CROPS, batch_size=6, backend=backend, workers=1)
    valid = eval_loader(source, size=16, resize=None, batch_size=10, backend=backend, workers=1)
    dls = crop_dataloaders(train, valid)
    model = CropsModel()
    learn = Learner(dls, model, loss_func=nn.CrossEntropyLoss())
    learn.fit(2, lr=1e-2)
    train_calls = [c for c in model.calls if len(c) == 4]
    valid_calls = [c for c in model.calls if len(c) == 1]
    assert len(train_calls) == 2 * len(train) == 8  # every training batch, both epochs
    assert train_calls[0] == [(6, 3, 16, 16)] * 2 + [(6, 3, 8, 8)] * 2
    assert len(valid_calls) == 2 * len(valid) == 6 and valid_calls[-1] == [(4, 3, 16, 16)]
    assert train.epoch == 2  # each fit epoch ran one loader epoch
    assert len(learn.recorder.values) == 2 and all(np.isfinite(v[0]) for v in learn.recorder.values)


def test_without_validation_and_adapter_api(source):
    train = pretrain_loader(source, CROPS, batch_size=6, backend="dali", workers=1)
    dls = crop_dataloaders(train)
    assert dls.train is train and len(dls.valid) == 0 and list(dls.valid) == []
    assert dls.device == torch.device("cpu") and dls.train_ds is source
    batch = dls.one_batch()
    assert len(batch) == 5 and train.epoch == 0  # one_batch did not start an epoch
    fig = dls.show_batch(max_n=3)
    assert len(fig.axes) == 3 * 4  # 3 images x 4 crops
    learn = Learner(dls, CropsModel(), loss_func=nn.CrossEntropyLoss())
    learn.fit(1, lr=1e-2)
    assert train.epoch == 1
    with pytest.raises(ValueError, match="train_loader"):
        crop_dataloaders([batch])
