"""DataWait: the share of training spent waiting for batches, against a loader that sleeps a known time."""

import time

import pytest
import torch
from fastai.data.core import DataLoaders
from fastai.learner import Learner

from carp_fast.callbacks.data_wait import DataWait


class SleepyLoader:
    """``n`` batches of ``(x [4, 8], y [4, 1])``; each takes ``sleep`` seconds to arrive."""

    def __init__(self, n: int, sleep: float):
        self.n, self.sleep = n, sleep

    def __len__(self):
        return self.n

    def __iter__(self):
        for _ in range(self.n):
            time.sleep(self.sleep)
            yield torch.randn(4, 8), torch.randn(4, 1)


def test_data_wait_share_of_a_sleeping_loader():
    n, sleep = 6, 0.05
    learn = Learner(DataLoaders(SleepyLoader(n, sleep), []), torch.nn.Linear(8, 1), loss_func=torch.nn.MSELoss(), cbs=[DataWait()])
    learn.fit(1)
    # Each batch blocked at least `sleep` in the loader, and not much longer (a sleep overshoots by ~ms).
    assert n * sleep <= learn.data_wait_seconds < n * sleep + 0.05
    # The model is tiny: almost the whole epoch is waiting for data.
    assert 0.7 < learn.data_wait <= 1.0
    assert not hasattr(learn.dl, "_owner")  # the loader is unwrapped after the epoch


def test_compute_bound_training_waits_little():
    class SlowStep(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(8, 1)

        def forward(self, x):
            time.sleep(0.03)  # a step that takes 30 ms, with data ready at once
            return self.lin(x)

    learn = Learner(DataLoaders(SleepyLoader(5, 0.0), []), SlowStep(), loss_func=torch.nn.MSELoss(), cbs=[DataWait()])
    learn.fit(1)
    assert learn.data_wait < 0.1
    assert learn.data_wait_now == pytest.approx(learn.data_wait, abs=0.05)
