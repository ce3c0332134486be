"""TimeBudget plans a fit to its budget: the schedules are sized to the measured step time, the
fit ends inside the budget with its schedules complete, a slower pace shortens the plan, and a
resumed run keeps the plan.

The budget's clock here is a fake that only the toy steps advance, so every number is exact on
any machine (a real clock made these tests depend on the CI machine's speed)."""

from types import SimpleNamespace

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException

from carp_fast.callbacks import Autocast, Checkpointer, TimeBudget
from carp_fast.callbacks import time_budget
from carp_fast.callbacks.schedule import OptimizerStepScheduler
from carp_fast.learner import CARPLearner
from tests.test_callbacks_in_any_learner import toy_learner

STEP = 0.0625  # seconds each toy step takes on the fake clock (exact in binary: the sums are exact)


class FakeClock:
    "``time.time`` for TimeBudget; only :class:`SlowSteps` moves it."

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(time_budget, "time", SimpleNamespace(time=fake.time))
    return fake


class SlowSteps(Callback):
    """Every training batch takes ``STEP`` seconds, ``slower`` times that from batch ``after`` on
    (a stand-in for a slow machine, and for one that slows down)."""

    def __init__(self, clock, slower=1.0, after=0):
        self.clock, self.slower, self.after, self.batches = clock, slower, after, 0

    def before_batch(self):
        if self.training:
            self.batches += 1
            self.clock.now += STEP * (self.slower if self.batches > self.after else 1.0)


def lr_schedule():
    return OptimizerStepScheduler({"lr": lambda pct: 0.1 * (1 - pct)})


def test_the_fit_is_sized_to_the_budget_and_its_schedule_completes(clock, capsys):
    budget_s, margin = 8.0, 0.125
    learn = toy_learner(SlowSteps(clock), lr_schedule(), Autocast(torch.bfloat16),
                        TimeBudget(minutes=budget_s / 60, margin=margin, warmup=2, measure=4, measure_seconds=0.25))
    start = clock.now
    learn.fit(1000)  # 4 batches an epoch: 1000 epochs is far more than the budget
    plan = learn.plan
    # Written from the definition: after 2 warm-up and 4 timed steps (4 STEP >= 0.25 s) the plan
    # fills what is left of the budget less its margin with steps of STEP seconds.
    planned_at = 2 + 4
    expected = planned_at + (budget_s * (1 - margin) - planned_at * STEP) / STEP  # 112 steps
    assert plan["steps"] == expected and plan["step_seconds"] == STEP
    assert learn.train_iter == plan["steps"] and learn.n_epoch == plan["epochs"] == -(-plan["steps"] // 4)
    assert clock.now - start == plan["steps"] * STEP <= budget_s and learn.stopped_early is False
    # The schedule ran to its end over the planned steps: last step at pct (S - 1) / S.
    assert learn.recorder.lrs[-1] == pytest.approx(0.1 / plan["steps"], rel=1e-6)
    out = capsys.readouterr().out
    assert f"plan: {plan['steps']} steps of batch 8" in out and "re-plan" not in out  # the pace held
    # Ending inside an epoch leaves no batch half-run: autocast (entered in before_batch) is off.
    assert not torch.is_autocast_enabled("cpu")


@pytest.mark.parametrize("slower", [2.0, 0.5], ids=["slows-down", "speeds-up"])
def test_a_machine_whose_pace_changes_is_re_planned_and_its_schedule_completes(clock, capsys, slower):
    budget_s, margin = 8.0, 0.125
    # From batch 20 on every step takes `slower` times as long: the first plan (112 steps) no
    # longer fits (2.0), or the first steps were a pessimistic measure (0.5).
    learn = toy_learner(SlowSteps(clock, slower=slower, after=20), lr_schedule(),
                        TimeBudget(minutes=budget_s / 60, margin=margin, warmup=2, measure=4, measure_seconds=0.25))
    start = clock.now
    learn.fit(1000)
    plan = learn.plan
    # All the steps that fit: 20 at STEP, then the rest of the budget less its margin at the new
    # pace (66 steps in all at 2.0, 204 at 0.5). The re-plans come after whole epochs, so up to
    # an epoch's steps (4) may be left unplanned.
    fit_all = 20 + (budget_s * (1 - margin) - 20 * STEP) / (slower * STEP)
    assert fit_all - 4 <= plan["steps"] <= fit_all and (plan["steps"] < 112) == (slower > 1)
    assert learn.train_iter == plan["steps"] and learn.stopped_early is False
    assert clock.now - start <= budget_s * (1 - margin)
    assert learn.recorder.lrs[-1] == pytest.approx(0.1 / plan["steps"], rel=1e-6)  # the schedule still ends
    assert f"re-plan: {plan['steps']} steps of batch 8" in capsys.readouterr().out


def test_a_budget_larger_than_the_epochs_runs_them_exactly(clock):
    learn = toy_learner(SlowSteps(clock), TimeBudget(minutes=60, warmup=1, measure=2, measure_seconds=0.0), lr_schedule())
    learn.fit(3)
    assert learn.plan["steps"] == learn.train_iter == 12 and learn.epoch == 2 and learn.stopped_early is False
    assert learn.recorder.lrs[-1] == pytest.approx(0.1 / 12, rel=1e-6)


def test_a_plain_learner_stops_after_the_planned_epochs(clock):
    """fastai's own Learner iterates ``range(n_epoch)`` fixed at the start: the plan ends it."""
    epochs_seen = []
    learn = toy_learner(SlowSteps(clock), TimeBudget(minutes=1.5 / 60, margin=0.125, warmup=1, measure=2, measure_seconds=0.1))
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


def test_a_resumed_run_keeps_its_plan(tmp_path, clock):
    budget = TimeBudget(minutes=3 / 60, margin=0.125, warmup=1, measure=2, measure_seconds=0.1)
    learn = carp_toy_learner(SlowSteps(clock), lr_schedule(), Checkpointer(tmp_path, {"toy": 1}), budget, StopAfterEpoch(1))
    learn.fit(1000)
    plan = learn.plan
    assert learn.train_iter == 8 and plan["steps"] > 12  # interrupted after 2 of its planned epochs
    # The resumed run has another budget: it goes on with the first plan, and ends where it said.
    # Steps three times as slow would re-plan in the first process; this one keeps the plan.
    resumed = carp_toy_learner(SlowSteps(clock, slower=3.0), lr_schedule(), Checkpointer(tmp_path, {"toy": 1}, resume=True),
                               TimeBudget(minutes=60))
    resumed.fit(1000)
    assert resumed.plan == plan and resumed.train_iter == plan["steps"]
    assert resumed.recorder.lrs[-1] == pytest.approx(0.1 / plan["steps"], rel=1e-6)
    assert resumed.planned_steps is None  # a later fit without a budget uses its own length


def test_margin_and_minutes_are_checked():
    with pytest.raises(ValueError, match="minutes"):
        TimeBudget(minutes=0)
    with pytest.raises(ValueError, match="margin"):
        TimeBudget(minutes=1, margin=1.5)
