"""TeacherEMA, momentum schedule, CARPStats, gradient accumulation, autocast."""

import math
import warnings

import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner
from fastai.optimizer import SGD
from torch.utils.data import DataLoader, TensorDataset

from carp_fast.callbacks import (
    Autocast, CARPStats, CollapseWarning, GradientAccumulation, TeacherEMA, assignment_stats, ema_update, teacher_momentum,
)
from carp_fast.carp import carp_learner


def test_momentum_schedule_end_points_and_shape():
    assert teacher_momentum(0.99, 0.0) == pytest.approx(0.99)
    assert teacher_momentum(0.99, 1.0) == pytest.approx(1.0)
    for p in (0.1, 0.25, 0.5, 0.9):
        assert teacher_momentum(0.99, p) == pytest.approx(1 - 0.01 * (math.cos(math.pi * p) + 1) / 2)
    assert teacher_momentum(0.99, 1.5) == pytest.approx(1.0)  # clamped past the end


def test_ema_update_formula():
    teacher = [torch.tensor([1.0, 2.0]), torch.tensor([[0.0]])]
    student = [torch.tensor([3.0, 0.0]), torch.tensor([[10.0]])]
    ema_update(teacher, student, 0.75)
    torch.testing.assert_close(teacher[0], torch.tensor([0.75 * 1 + 0.25 * 3, 0.75 * 2 + 0.25 * 0]))
    torch.testing.assert_close(teacher[1], torch.tensor([[2.5]]))


def test_teacher_ema_in_a_learner_follows_the_formula(tiny_dls, tiny_config):
    learn = carp_learner(tiny_dls, tiny_config, progress=False)
    model = learn.model
    seen = []

    class Spy(TeacherEMA.__mro__[1]):  # a fastai Callback recording before/after the EMA
        order = TeacherEMA.order - 1

        def after_step(self):
            seen.append([p.detach().clone() for p in model.teacher.parameters()])

    learn.add_cb(Spy())
    learn.fit(1)
    assert len(seen) == len(tiny_dls.train)
    # After the last step: teacher = m * teacher_before + (1 - m) * student.
    m = learn.teacher_momentum
    assert m == pytest.approx(teacher_momentum(0.99, (len(tiny_dls.train) - 1) / len(tiny_dls.train)))
    for before, t, s in zip(seen[-1], model.teacher.parameters(), model.student.parameters()):
        torch.testing.assert_close(t.detach(), m * before + (1 - m) * s.detach(), rtol=1e-5, atol=1e-6)


def test_assignment_stats_against_hand_count():
    partition = torch.tensor([[3, 0], [1, 2]])  # K = 4
    student = torch.zeros(3, 2, 2, 2)
    teacher = torch.zeros(2, 2, 2, 2)
    # teacher view 0: image 0 -> block 0 slot 0 (prototype 3), image 1 -> prototype 2
    teacher[0, 0, 0, 0] = teacher[0, 1, 1, 1] = 5
    # teacher view 1: both images -> prototype 3
    teacher[1, 0, 0, 0] = teacher[1, 1, 0, 0] = 5
    # student views: all images -> prototype 3
    student[:, :, 0, 0] = 5
    agreement, hit, perplexity = assignment_stats(student, teacher, partition, n_prototypes=4).tolist()
    # pairs i != j: (0,1): both agree (3 == 3, 3 == 3) -> 2; (1,0): 3==3, 3!=2 -> 1;
    # (2,0): 1; (2,1): 2 -> 6 agreements out of 4 pairs x 2 images.
    assert agreement == pytest.approx(6 / 8)
    assert hit == 2  # prototypes 3 and 2
    p = torch.tensor([3 / 4, 1 / 4])
    assert perplexity == pytest.approx(float(torch.exp(-(p * p.log()).sum())))


def test_carp_stats_logs_and_warns_on_collapse(tiny_dls, tiny_config):
    learn = carp_learner(tiny_dls, tiny_config, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CollapseWarning)
        learn.fit(1)  # a random network is far from collapse
    history = learn.carp_stats.history
    assert [r["step"] for r in history] == [2, 4]
    assert set(history[0]) >= {"loss", "consistency", "entropy", "lr", "momentum", "agreement", "prototypes_hit", "perplexity"}
    assert history[-1]["loss"] == pytest.approx(history[-1]["consistency"] + history[-1]["entropy"], rel=1e-6)

    # Force a collapse: a constant embedding, so every view picks the same prototype.
    with torch.no_grad():
        for net in (learn.model.student, learn.model.teacher):
            net.head.mlp[-1].weight.zero_()
            net.head.mlp[-1].bias.copy_(torch.linspace(-1, 1, 16))
    learn.remove_cb(TeacherEMA)
    learn.opt = None
    with pytest.warns(CollapseWarning, match="collapsing"):
        learn.fit(1, lr=0.0)


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    x, y = torch.randn(16, 5), torch.randn(16, 1)

    def trained(batch_size, n_steps):
        torch.manual_seed(1)
        model = torch.nn.Linear(5, 1)
        dls = DataLoaders(DataLoader(TensorDataset(x, y), batch_size=batch_size), DataLoader(TensorDataset(x[:0], y[:0])))
        # Plain SGD: Adam's first step ignores the gradient's scale and would hide a wrong
        # loss division.
        learn = Learner(dls, model, loss_func=torch.nn.functional.mse_loss, opt_func=SGD, lr=0.1, cbs=[GradientAccumulation(n_steps)])
        learn.model_dir = "."
        with learn.no_logging(), learn.no_bar():
            learn.fit(1, lr=0.1)
        return model.weight.detach().clone()

    torch.testing.assert_close(trained(16, 1), trained(8, 2), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(trained(16, 1), trained(8, 1))


def test_gradient_accumulation_steps_from_config(tiny_config):
    assert tiny_config.accumulation_steps(1) == 1
    from carp_fast.carp import CARPConfig

    assert CARPConfig(batch_size=64, global_batch=4096).accumulation_steps(4) == 16
    with pytest.raises(ValueError, match="global_batch=100"):
        CARPConfig(batch_size=64, global_batch=100).accumulation_steps(1)


def test_autocast_runs_the_forward_in_bfloat16_on_cpu(tiny_dls, tiny_config):
    tiny_config.precision = "bf16"
    learn = carp_learner(tiny_dls, tiny_config, progress=False)
    dtypes = []
    learn.model.student.head.register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    learn.fit(1)
    assert dtypes and all(d == torch.bfloat16 for d in dtypes)
    assert isinstance(learn.autocast, Autocast)
    assert all(p.dtype == torch.float32 for p in learn.model.parameters())
    assert not torch.is_autocast_enabled("cpu")
