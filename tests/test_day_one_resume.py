"""Exact resume: gradients of a half-finished accumulation, per-rank random states (issue 12)."""

import functools
import os
import random

import numpy as np
import pytest
import torch

import carp_fast.checkpoint as checkpoint
from carp_fast.callbacks import GradientAccumulation
from tests.conftest import run_ranks
from tests.test_train import run_cli

# 96 images in micro-batches of 32, two per step: 3 micro-batches an epoch, so every epoch
# ends in the middle of an accumulation.
MID_ACCUMULATION = ["--batch-size", "32", "--global-batch", "64", "--train-images", "96", "--knn-every", "0", "--epochs", "2"]


class _Killed(Exception):
    pass


def test_resume_mid_accumulation_ends_with_the_same_weights(tmp_path, monkeypatch):
    run_cli(tmp_path / "full", *MID_ACCUMULATION)

    save = checkpoint.save_checkpoint
    counts = []

    def save_then_die(learn, path, *, next_epoch, settings):
        save(learn, path, next_epoch=next_epoch, settings=settings)
        counts.append(learn.gradient_accumulation.count)
        raise _Killed("killed after the checkpoint")  # fastai re-raises with args[0]

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        run_cli(tmp_path / "killed", *MID_ACCUMULATION)
    monkeypatch.setattr(checkpoint, "save_checkpoint", save)
    assert counts == [3]  # the checkpoint holds one micro-batch of a two-micro-batch step
    run_cli(tmp_path / "killed", *MID_ACCUMULATION, "--resume")

    a = torch.load(tmp_path / "full" / "checkpoint.pth", weights_only=False)
    b = torch.load(tmp_path / "killed" / "checkpoint.pth", weights_only=False)
    assert a["train_iter"] == b["train_iter"] == 6
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][key]), key


class _FakeLearn:
    "The minimum save_checkpoint and restore_checkpoint read."

    def __init__(self):
        self.model = torch.nn.Linear(2, 1)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1)
        self.train_iter = 0


def _rng_worker(rank, port, queue, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2", ACCELERATE_USE_CPU="1")
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    torch.manual_seed(100 + rank), np.random.seed(100 + rank), random.seed(100 + rank)  # the ranks' streams differ
    learn = _FakeLearn()
    # Mid-accumulation (1 of 2 micro-batches), each rank with its own partial sums.
    learn.gradient_accumulation = GradientAccumulation(2)
    learn.gradient_accumulation.count = 1
    for p in learn.model.parameters():
        p.grad = torch.full_like(p, float(rank))
    checkpoint.save_checkpoint(learn, path, next_epoch=1, settings={})
    at_save = torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate()
    torch.rand(5), np.random.rand(5), random.random()  # move on
    learn.model.zero_grad()
    accelerator.wait_for_everyone()
    checkpoint.restore_checkpoint(learn, checkpoint.load_checkpoint(path))
    same = (torch.equal(torch.get_rng_state(), at_save[0]), np.array_equal(np.random.get_state()[1], at_save[1]), random.getstate() == at_save[2])
    # The mean over ranks, which DDP's all-reduce at the step would have taken.
    mean_grads = all(torch.equal(p.grad, torch.full_like(p, 0.5)) for p in learn.model.parameters())
    queue.put((rank, (*same, mean_grads)))


def test_each_rank_resumes_its_own_random_state_and_the_mean_accumulated_gradients(tmp_path):
    results = run_ranks(functools.partial(_rng_worker, path=str(tmp_path / "checkpoint.pth")), 2, timeout=300)
    # (torch, numpy, python random states as at the save, gradients = their mean over ranks)
    assert results == {0: (True, True, True, True), 1: (True, True, True, True)}


def test_resume_on_fewer_processes_warns_and_restores_rank_0(tmp_path):
    learn = _FakeLearn()
    torch.manual_seed(5)
    checkpoint.save_checkpoint(learn, tmp_path / "c.pth", next_epoch=1, settings={})
    state = checkpoint.load_checkpoint(tmp_path / "c.pth")
    rank_0 = torch.get_rng_state()
    state["rng"] = [state["rng"][0], {**state["rng"][0], "torch": torch.zeros_like(rank_0)}]  # as saved by 2 processes
    torch.rand(3)
    with pytest.warns(UserWarning, match="saved by 2 processes, resumed on 1"):
        checkpoint.restore_checkpoint(learn, state)
    assert torch.equal(torch.get_rng_state(), rank_0)
