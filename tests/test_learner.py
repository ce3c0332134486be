"""carp_learner end to end on the CPU: all callbacks, logged values, save and load."""

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

from carp_fast.callbacks import KNNMonitor
from carp_fast.carp import CARPConfig, carp_learner


def labelled_loader(n, seed):
    g = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(torch.randn(n, 3, 16, 16, generator=g), torch.randint(0, 4, (n,), generator=g)), batch_size=16)


def test_fit_with_all_callbacks_changes_both_networks_and_logs(tiny_dls, tiny_config, tmp_path):
    tiny_config.optimizer = "lars"
    learn = carp_learner(tiny_dls, tiny_config, cbs=[KNNMonitor(labelled_loader(24, 1), labelled_loader(12, 2), every=1, k=5)], path=tmp_path)
    student0 = [p.detach().clone() for p in learn.model.student.parameters()]
    teacher0 = [p.detach().clone() for p in learn.model.teacher.parameters()]
    learn.fit(2)

    changed = lambda before, module: sum(not torch.equal(a, b.detach()) for a, b in zip(before, module.parameters()))
    assert changed(student0, learn.model.student) > 0.5 * len(student0)
    assert changed(teacher0, learn.model.teacher) > 0.5 * len(teacher0)

    history = learn.carp_stats.history
    assert len(history) == 4 and history[-1]["epoch"] == 1
    lrs = [r["lr"] for r in history]
    assert lrs == sorted(lrs, reverse=True) and lrs[0] <= tiny_config.peak_lr()
    assert all(0.99 <= r["momentum"] <= 1.0 for r in history)
    knn = learn.knn_monitor.history
    assert [r["epoch"] for r in knn] == [0, 1] and all(0 <= r["knn_top1"] <= 100 for r in knn)
    assert learn.knn_top1 == knn[-1]["knn_top1"]
    assert len(learn.recorder.losses) == 2 * len(tiny_dls.train)
    assert learn.images_per_s > 0

    # learn.save keeps student, teacher and the partition sampler's state.
    learn.save("final")
    state = torch.load(tmp_path / "models" / "final.pth", weights_only=False)
    keys = state["model"].keys() if "model" in state else state.keys()
    assert any(k.startswith("teacher.backbone.") for k in keys) and "partitioner._extra_state" in keys


def test_learning_rate_scaling_and_cosine_decay(tiny_dls, tiny_config):
    tiny_config.base_lr, tiny_config.global_batch, tiny_config.log_every = 0.6, 8, 1
    learn = carp_learner(tiny_dls, tiny_config, progress=False)
    learn.fit(1)
    peak = 0.6 * 8 / 256
    # fastai's cosine at pct_train = i / n for the n = 4 batches of the fit.
    expected = [peak + (1 + torch.cos(torch.tensor(torch.pi * (1 - i / 4))).item()) * (tiny_config.final_lr - peak) / 2 for i in range(4)]
    assert learn.recorder.lrs == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(block_size=0), "block_size"),
        (dict(n_prototypes=8, block_size=16), "block_size"),
        (dict(base_lr=-0.1), "base_lr"),
        (dict(partition="sometimes"), "partition"),
        (dict(optimizer="sgd"), "optimizer"),
        (dict(precision="fp8"), "precision"),
        (dict(teacher_momentum=1.5), "teacher_momentum"),
        (dict(optimizer="adamw", base_lr=1e-3, global_batch=256), "final_lr"),  # 0.006 above a 1e-3 peak
    ],
)
def test_config_rejects_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CARPConfig(**kwargs)


@pytest.mark.parametrize("partition,block_size", [("fixed", 16), ("random", 64)])
def test_ablation_settings_train(tiny_dls, tiny_config, partition, block_size):
    tiny_config.partition, tiny_config.block_size = partition, block_size
    learn = carp_learner(tiny_dls, tiny_config, progress=False)
    learn.fit(1)
    assert learn.carp_stats.history[-1]["loss"] > 0
