"""The time budget: its arithmetic (carp_fast.budget, pure functions, against numbers worked out
by hand) and the TimeBudget callback that applies it. The fit is sized to the measured step
time, ends inside the budget with its schedules complete, a pace that changes re-plans it (only
the steps not yet taken), and a resumed run keeps the plan.

The callback's clock here is a fake that only the toy steps advance, so every number is exact on
any machine (a real clock made these tests depend on the CI machine's speed)."""

from types import SimpleNamespace

import pytest
import torch
from fastai.callback.core import Callback, CancelFitException

from carp_fast.budget import Plan, lengthen_threshold, plan_steps, replan, steps_that_fit
from carp_fast.callbacks import Autocast, Checkpointer, TimeBudget
from carp_fast.callbacks import time_budget
from carp_fast.callbacks.schedule import OptimizerStepScheduler
from carp_fast.learner import PretrainLearner
from tests.test_callbacks_in_any_learner import toy_learner

# ---- the arithmetic: carp_fast.budget, no Learner ------------------------------------------

# A budget of 100 s, 10 s of it gone, a margin of 10 %: 80 s left, 160 steps of 0.5 s after 20.
BUDGET = dict(budget_seconds=100.0, elapsed_seconds=10.0, margin=0.1, step_seconds=0.5, steps_done=20,
              steps_per_epoch=50, max_epochs=100)


def test_a_plan_fills_what_is_left_of_the_budget_less_its_margin():
    assert steps_that_fit(**BUDGET) == 20 + 160
    # 180 steps, 4 epochs of 50 (the last cut short); 10 s + 160 steps of 0.5 s = 90 s.
    assert plan_steps(**BUDGET) == Plan(steps=180, epochs=4, step_seconds=0.5, minutes=1.5)
    assert plan_steps(**BUDGET).as_dict() == {"steps": 180, "epochs": 4, "step_seconds": 0.5, "minutes": 1.5}
    assert steps_that_fit(**{**BUDGET, "max_epochs": 2}) == 100  # at most fit's epochs


@pytest.mark.parametrize("every, epoch, steps_done, expected", [
    # 80 s - 5 s for the final evaluation: 150 steps, to 170 (epochs 0-3). Due before the last
    # epoch's (the final one): every epoch's, 0, 1 and 2: 3 x 5 s less, 120 steps.
    (1, 0, 20, 20 + 120),
    (2, 0, 20, 20 + 140),  # only epoch 1's (an evaluation after epochs 2, 4, ...): 140 steps
    # From epoch 1 (60 steps done): 60 + 150 = 210 steps, epochs 1-4; epochs 1 and 3 evaluate.
    (2, 1, 60, 60 + 130),
    (0, 0, 20, 20 + 150),  # no monitor: only the final evaluation is reserved
])
def test_the_k_nn_evaluations_are_reserved(every, epoch, steps_done, expected):
    fit = {**BUDGET, "eval_seconds": 5.0, "every": every, "epoch": epoch, "steps_done": steps_done}
    assert steps_that_fit(**fit) == expected
    plan = plan_steps(**fit)
    assert plan.steps == expected and plan.minutes == (10.0 + (expected - steps_done) * 0.5 + 5.0) / 60


def test_a_spent_budget_still_plans_one_step_to_take():
    """A plan no longer than the steps taken would leave them on the old schedule's length: the
    training would end at once, its schedules unfinished. One step more ends them."""
    spent = {**BUDGET, "elapsed_seconds": 95.0}
    assert steps_that_fit(**spent) == 21 and plan_steps(**spent).epochs == 1
    assert steps_that_fit(**{**spent, "steps_done": 100, "max_epochs": 2}) == 100  # no epoch left: none more


@pytest.mark.parametrize("current, per_epoch, expected", [(50, 192, 1), (100, 192, 1), (101, 192, 2), (1739, 192, 18),
                                                          (700, 192, 7), (100_000, 192, 192)])
def test_a_plan_lengthens_only_when_one_percent_more_steps_fit_or_an_epoch_s_if_fewer(current, per_epoch, expected):
    assert lengthen_threshold(current, per_epoch) == expected


def test_a_re_plan_shrinks_whenever_fewer_steps_fit_and_lengthens_by_the_threshold():
    assert replan(1000, 900, 500, 50) == 900
    assert replan(1000, 999, 500, 50) == 999  # any step too many is taken off
    assert replan(1000, 1009, 500, 50) is None and replan(1000, 1000, 500, 50) is None  # under 1 %: kept
    assert replan(1000, 1010, 500, 50) == 1010


def test_a_re_plan_only_moves_steps_not_yet_taken():
    """CI's flake: 9 epochs of 192 steps (1728) run on a plan of 1739; at the end of the 9th the
    pace measured again fits fewer steps than those taken. The re-plan was max(fits, steps taken)
    = 1728: the fit ended there, its last step run at 1727 / 1739 of the schedule, not 1727 / 1728
    (learning rate 1.0000294e-4 where the cosine ends at 1.00000207e-4). Now one step is left to
    take at the new length, whose last step ends the schedules."""
    assert replan(1739, 1700, 1728, 192) == 1729
    assert replan(1739, 1728, 1728, 192) == 1729
    assert replan(1739, 1000, 1739, 192) is None  # the plan is run: its schedules have ended
    assert replan(1739, 2000, 1800, 192) is None


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


def test_a_re_plan_at_an_epoch_end_with_no_step_left_in_the_budget_still_completes_the_schedule(clock, capsys):
    """The CI flake, on the fake clock: steps 101-104 (epoch 25) take 4 STEP each, so at its end
    7.25 s of the 7 s the plan may use are gone and no step of the first plan's 112 fits. The
    re-plan used to end the fit there, 104 steps run on a schedule of 112 (a last learning rate
    of 0.1 * 9 / 112, not 0.1 / 104); now it plans 105, one step more (0.25 s, inside the 8 s)."""
    budget_s, margin = 8.0, 0.125
    learn = toy_learner(SlowSteps(clock, slower=4.0, after=100), lr_schedule(),
                        TimeBudget(minutes=budget_s / 60, margin=margin, warmup=2, measure=4, measure_seconds=0.25))
    start = clock.now
    learn.fit(1000)
    assert learn.plan["steps"] == learn.train_iter == 105 and learn.n_epoch == learn.plan["epochs"] == 27
    assert learn.stopped_early is False and clock.now - start == 100 * STEP + 5 * 4 * STEP <= budget_s
    assert learn.recorder.lrs[-1] == pytest.approx(0.1 / 105, rel=1e-6)
    out = capsys.readouterr().out
    assert "plan: 112 steps of batch 8" in out and "re-plan: 105 steps of batch 8" in out


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
    learn.__class__ = PretrainLearner  # its _do_fit starts at a resumed epoch and re-reads n_epoch
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


def test_a_budget_too_small_for_one_epoch_is_warned_about_once_in_one_line(clock, capsys):
    # A plan after 2 steps of a 4-step epoch, with the 0.05 s budget spent: 3 steps, not an epoch.
    learn = toy_learner(SlowSteps(clock), TimeBudget(minutes=0.05 / 60, warmup=1, measure=1, measure_seconds=0.0))
    learn.fit(1000)
    assert learn.train_iter == learn.plan["steps"] == 3
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert err == ["warning: --minutes 0.000833333 is too small for one epoch here: an epoch is 4 steps at 0.0625 s a step "
                   "(0.0042 minutes); the run takes 3 steps, about 0.0031 minutes in all"]
    # No plan before the first epoch ends (the steps are timed for 1 s), and the budget spent by then.
    learn = toy_learner(SlowSteps(clock), TimeBudget(minutes=0.05 / 60, warmup=1, measure=1, measure_seconds=1.0))
    learn.fit(1000)
    assert learn.epoch == 0 and learn.stopped_early
    err = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert len(err) == 1 and "too small for one epoch here: it was spent before the steps could be timed (epoch 0 took 0.25 s)" in err[0]
    # A budget that fits: no warning.
    learn = toy_learner(SlowSteps(clock), TimeBudget(minutes=2 / 60, warmup=1, measure=1, measure_seconds=0.0))
    learn.fit(1000)
    assert "warning" not in capsys.readouterr().err
