"""TimeBudget plans a fit to its budget: the schedules are sized to the measured step time, the
fit ends inside the budget with its schedules complete, and a resumed run keeps the plan."""

import time

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException

from carp_fast.callbacks import Autocast, Checkpointer, TimeBudget
from carp_fast.callbacks.schedule import OptimizerStepScheduler
from carp_fast.learner import CARPLearner
from tests.test_callbacks_in_any_learner import toy_learner

STEP = 0.05  # seconds each toy step sleeps: the step time the plan must measure


class SlowSteps(Callback):
    """Every training batch takes STEP seconds (a stand-in for a slow machine)."""

    def before_batch(self):
        if self.training:
            time.sleep(STEP)


def lr_schedule():
    return OptimizerStepScheduler({"lr": lambda pct: 0.1 * (1 - pct)})


def test_the_fit_is_sized_to_the_budget_and_its_schedule_completes(capsys):
    budget_s = 4.0
    learn = toy_learner(SlowSteps(), lr_schedule(), Autocast(torch.bfloat16),
                        TimeBudget(minutes=budget_s / 60, margin=0.15, warmup=2, measure=4, measure_seconds=0.2))
    start = time.time()
    learn.fit(1000)  # 4 batches an epoch: 1000 epochs is far more than the budget
    took = time.time() - start
    plan = learn.plan
    # Written from the definition: the steps left after the plan fill what is left of the budget.
    planned_at = 2 + 4  # warm-up + measured steps, then the plan
    expected = planned_at + (0.85 * budget_s - planned_at * STEP) / STEP
    assert plan["steps"] == pytest.approx(expected, rel=0.2)
    assert learn.train_iter == plan["steps"] and learn.n_epoch == plan["epochs"] == -(-plan["steps"] // 4)
    assert took <= budget_s + 0.5 and learn.stopped_early is False
    # The schedule ran to its end over the planned steps: last step at pct (S - 1) / S.
    assert learn.recorder.lrs[-1] == pytest.approx(0.1 / plan["steps"], rel=1e-6)
    assert f"plan: {plan['steps']} steps of batch 8" in capsys.readouterr().out
    # Ending inside an epoch leaves no batch half-run: autocast (entered in before_batch) is off.
    assert not torch.is_autocast_enabled("cpu")


def test_a_budget_larger_than_the_epochs_runs_them_exactly():
    learn = toy_learner(TimeBudget(minutes=60, warmup=1, measure=2, measure_seconds=0.0), lr_schedule())
    learn.fit(3)
    assert learn.plan["steps"] == learn.train_iter == 12 and learn.epoch == 2 and learn.stopped_early is False
    assert learn.recorder.lrs[-1] == pytest.approx(0.1 / 12, rel=1e-6)


def test_a_plain_learner_stops_after_the_planned_epochs():
    """fastai's own Learner iterates ``range(n_epoch)`` fixed at the start: the plan ends it."""
    epochs_seen = []
    learn = toy_learner(SlowSteps(), TimeBudget(minutes=1.5 / 60, margin=0.15, warmup=1, measure=2, measure_seconds=0.1))
    learn.add_cb(type("Epochs", (Callback,), {"after_epoch": lambda self: epochs_seen.append(self.epoch)})())
    learn.fit(1000)
    assert len(epochs_seen) == learn.plan["epochs"] < 1000 and learn.train_iter == learn.plan["steps"]


def carp_toy_learner(*cbs):
    from fastai.callback.progress import ProgressCallback

    learn = toy_learner(*cbs)
    learn.remove_cb(ProgressCallback)  # carp_learner shows RichProgress; fastai's bar cannot start mid-fit
    learn.__class__ = CARPLearner  # its _do_fit starts at a resumed epoch and re-reads n_epoch
    return learn


class StopAfterEpoch(Callback):
    order = Checkpointer.order + 10  # after the checkpoint of that epoch

    def __init__(self, epoch):
        self.stop_epoch = epoch

    def after_epoch(self):
        if self.epoch == self.stop_epoch:
            raise CancelFitException()


def test_a_resumed_run_keeps_its_plan(tmp_path):
    budget = TimeBudget(minutes=3 / 60, margin=0.15, warmup=1, measure=2, measure_seconds=0.1)
    learn = carp_toy_learner(SlowSteps(), lr_schedule(), Checkpointer(tmp_path, {"toy": 1}), budget, StopAfterEpoch(1))
    learn.fit(1000)
    plan = learn.plan
    assert learn.train_iter == 8 and plan["steps"] > 12  # interrupted after 2 of its planned epochs
    # The resumed run has another budget: it goes on with the first plan, and ends where it said.
    resumed = carp_toy_learner(lr_schedule(), Checkpointer(tmp_path, {"toy": 1}, resume=True), TimeBudget(minutes=60))
    resumed.fit(1000)
    assert resumed.plan == plan and resumed.train_iter == plan["steps"]
    assert resumed.recorder.lrs[-1] == pytest.approx(0.1 / plan["steps"], rel=1e-6)
    assert resumed.planned_steps is None  # a later fit without a budget uses its own length


def test_margin_and_minutes_are_checked():
    with pytest.raises(ValueError, match="minutes"):
        TimeBudget(minutes=0)
    with pytest.raises(ValueError, match="margin"):
        TimeBudget(minutes=1, margin=1.5)
