"""The callbacks the README lists as working in any Learner do, in a plain fastai Learner on a
toy model; and fastai's own habits (lr_find, show_batch, save/load) work on a CARP Learner."""

import json

import pytest
import torch
from fastai.callback.core import TrainEvalCallback
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch.utils.data import DataLoader, TensorDataset

from carp_fast.callbacks import (Autocast, Checkpointer, DataWait, DeviceRecorder, EpochSync, FP16MixedPrecision,
                                 GradientAccumulation, MetricsLogger, RichProgress, TimeBudget)
from carp_fast.callbacks.channels_last import ChannelsLastInputs
from carp_fast.callbacks.schedule import OptimizerStepScheduler


class Toy(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.head = torch.nn.Conv2d(3, 4, 3), torch.nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.conv(x).mean((2, 3)))


class EpochLoader(DataLoader):
    """A torch loader with set_epoch, as the project's pipelines have."""

    epochs = []

    def set_epoch(self, epoch):
        self.epochs.append(epoch)


def toy_learner(*cbs, default_cbs=True):
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.randn(32, 3, 8, 8, generator=g), torch.randn(32, 1, generator=g))
    dls = DataLoaders(EpochLoader(data, batch_size=8), DataLoader(data, batch_size=8))
    torch.manual_seed(0)
    return Learner(dls, Toy(), loss_func=torch.nn.MSELoss(), opt_func=SGD, lr=0.01, cbs=list(cbs), default_cbs=default_cbs)


def test_gradient_accumulation_steps_every_n_batches():
    learn = toy_learner(GradientAccumulation(2))
    steps = []
    learn.add_cb(type("Count", (TrainEvalCallback.__base__,), {"after_step": lambda self: steps.append(self.learn.iter)})())
    learn.fit(1)
    assert steps == [1, 3]  # 4 batches, a step after every second


def test_precision_callbacks_autocast_a_plain_model():
    seen = {}
    learn = toy_learner(Autocast(torch.bfloat16))
    learn.add_cb(type("Spy", (TrainEvalCallback.__base__,), {"after_pred": lambda self: seen.setdefault("dtype", self.learn.pred.dtype)})())
    learn.fit(1)
    assert seen["dtype"] == torch.bfloat16
    fp16 = FP16MixedPrecision("cpu")
    learn = toy_learner(fp16)
    learn.fit(1)
    assert fp16.grad_scaler.get_scale() > 0


def test_recorder_epoch_sync_data_wait_channels_last_and_schedule():
    learn = toy_learner(TrainEvalCallback(), DeviceRecorder(), EpochSync(), DataWait(), ChannelsLastInputs(),
                        OptimizerStepScheduler({"lr": lambda pct: 0.1 * (1 - pct)}), default_cbs=False)
    EpochLoader.epochs = []
    learn.fit(2)
    assert len(learn.recorder.losses) == 8 and EpochLoader.epochs == [0, 1]
    assert 0 <= learn.data_wait <= 1
    assert learn.recorder.lrs[0] == pytest.approx(0.1) and learn.recorder.lrs[-1] == pytest.approx(0.1 / 8)


def test_progress_metrics_checkpoints_and_budget(tmp_path, capsys):
    learn = toy_learner(RichProgress(images_per_batch=8, live=False), MetricsLogger(tmp_path, tensorboard=False),
                        Checkpointer(tmp_path, {"toy": 1}), TimeBudget(minutes=60))
    learn.fit(2)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0, 1] and all(r["images_per_s"] > 0 for r in lines)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["epoch"] == 2
    assert capsys.readouterr().out.count("img/s") >= 2 and learn.stopped_early is False


def test_lr_find_show_batch_save_and_load_on_a_carp_learner(tmp_path):
    import numpy as np

    from carp_fast.callbacks import KNNMonitor
    from carp_fast.carp import CARPConfig, carp_learner
    from carp_fast.pipelines import ArraySource, MultiCropConfig, crop_dataloaders, eval_loader, pretrain_loader

    rng = np.random.default_rng(0)
    source = ArraySource(rng.integers(0, 255, (64, 16, 16, 3), dtype=np.uint8), rng.integers(0, 4, 64))
    crops = MultiCropConfig(global_size=16, local_size=8, local_crops=2, blur_sigma=(0.1, 0.5))
    dls = crop_dataloaders(pretrain_loader(source, crops, batch_size=16, backend="torchvision", workers=1))
    config = CARPConfig(arch="resnet10_tiny", n_prototypes=64, block_size=16, hidden_dim=32, embed_dim=16,
                        batch_size=16, global_batch=16, precision="fp32", optimizer="adamw", base_lr=1e-3, final_lr=1e-6)
    knn_dl = eval_loader(source, size=16, resize=None, batch_size=32, backend="torchvision", workers=1)
    learn = carp_learner(dls, config, path=tmp_path, progress=False,
                         cbs=[MetricsLogger(tmp_path), Checkpointer(tmp_path, {}), KNNMonitor(knn_dl, knn_dl)])

    suggestion = learn.lr_find(num_it=6, show_plot=False)
    assert suggestion.valley > 0
    # The run's file writers and evaluations stood aside; the schedule is the run's again.
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoint.pth").exists()
    assert learn.knn_monitor.history == []

    dls.show_batch(max_n=2)  # fastai's habit, on the crops
    learn.fit(1)
    assert learn.opt.hypers[-1]["lr"] < config.peak_lr()  # the cosine ran, not lr_find's sweep
    learn.save("final")
    before = {k: v.clone() for k, v in learn.model.state_dict().items() if isinstance(v, torch.Tensor)}
    learn.model.teacher.backbone.conv1.weight.data.zero_()
    learn.load("final")
    assert all(torch.equal(v, learn.model.state_dict()[k]) for k, v in before.items())
