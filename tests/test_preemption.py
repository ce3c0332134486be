"""A signal in the middle of an epoch: a checkpoint at the step's end, exit status 75, and a
--resume that ends with exactly the weights of an uninterrupted run (CARP and MaSSL, gradient
accumulation, one and two processes); step checkpoints every few minutes."""

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from carp_fast.callbacks.preemption import ABORT_AFTER, EXIT_PREEMPTED, Preemption

REPO = Path(__file__).resolve().parents[1]
# 512 images at batch 64 = 8 micro-batches an epoch, 2 per optimizer step (global batch 128).
COMMON = ["--batch-size", "64", "--global-batch", "128", "--train-images", "512", "--knn-bank", "600",
          "--knn-queries", "300", "--workers", "1", "--log-every", "2", "--precision", "fp32", "--no-progress",
          "--knn-every", "0", "--no-knn-random-init", "--arch", "resnet10_tiny", "--hidden-dim", "64", "--embed-dim", "32",
          "--epochs", "3", "--minutes", "none"]
METHODS = {
    "carp": ("fashion_mnist", ["--n-prototypes", "128", "--block-size", "16"]),
    "massl": ("fashion_mnist_massl", ["--memory-size", "512", "--block-size", "64"]),
}
# Runs a recipe with one extra callback that sends SIGTERM to its own process (rank KILL_RANK)
# after micro-batch KILL_AT: a real signal, at a known place in the middle of an epoch.
DRIVER = textwrap.dedent("""
    import importlib, os, signal, sys
    import carp_fast.run as run
    from fastai.callback.core import Callback

    class SignalAt(Callback):
        def after_batch(self):
            at, rank = int(os.environ.get("KILL_AT", "-1")), int(os.environ.get("KILL_RANK", "0"))
            if self.learn.train_iter == at and int(os.environ.get("RANK", "0")) == rank:
                os.kill(os.getpid(), signal.SIGTERM)

    add = run.run_callbacks
    run.run_callbacks = lambda *args, **kwargs: add(*args, **kwargs) + [SignalAt()]
    importlib.import_module("carp_fast.recipes." + sys.argv[1]).main(sys.argv[2:])
""")


def _run(tmp_path, method, out, *extra, processes=1, kill_at=None, kill_rank=0):
    recipe, options = METHODS[method]
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "KILL_AT": str(-1 if kill_at is None else kill_at), "KILL_RANK": str(kill_rank)}
    accelerate = str(Path(sys.executable).parent / "accelerate")
    launch = [sys.executable, str(driver)] if processes == 1 else [
        accelerate, "launch", "--multi_gpu", "--num_processes", str(processes), str(driver)]
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
    cmd = [*launch, recipe, *COMMON, *options, "--out", str(out), *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env, cwd=REPO)


def _same_weights(a_dir, b_dir):
    a = torch.load(a_dir / "checkpoint.pth", weights_only=False)
    b = torch.load(b_dir / "checkpoint.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and a["train_iter"] == b["train_iter"] == 24
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][key]), key


@pytest.mark.slow
@pytest.mark.parametrize("method, processes", [("carp", 1), ("massl", 1), ("carp", 2)])
def test_sigterm_mid_epoch_then_resume_ends_with_the_same_weights(tmp_path, method, processes):
    full, stopped = tmp_path / "full", tmp_path / "stopped"
    batch = ["--batch-size", "32"] if processes == 2 else []  # 2 x 32 x 2 micro-batches = 128
    done = _run(tmp_path, method, full, *batch, processes=processes)
    assert done.returncode == 0, done.stderr[-3000:]

    # The signal comes after micro-batch 11, inside optimizer step 6 (accumulation 2): the step
    # finishes with micro-batch 12, batch 4 of epoch 2 (8 a epoch), and the run stops there.
    # With two processes only rank 1 receives the signal: rank 0 must stop at the same step.
    killed = _run(tmp_path, method, stopped, *batch, processes=processes, kill_at=11, kill_rank=processes - 1)
    if processes == 1:
        assert killed.returncode == EXIT_PREEMPTED, killed.stderr[-3000:]
    else:
        assert killed.returncode != 0  # the launcher reports its workers' status 75 as a failure
    name = "SIGTERM" if processes == 1 else "a signal on another process"  # what rank 0 saw
    assert f"stopped by {name} in epoch 2 after batch 4 of 8 (optimizer step 6)" in killed.stdout + killed.stderr
    state = torch.load(stopped / "checkpoint.pth", weights_only=False)
    assert (state["epoch"], state["batch"], state["train_iter"]) == (1, 4, 12)
    assert not (stopped / "summary.json").exists()  # a stopped run is not finished

    resumed = _run(tmp_path, method, stopped, *batch, "--resume", processes=processes)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    _same_weights(full, stopped)


@pytest.mark.slow
def test_step_checkpoints_are_written_inside_the_epoch(tmp_path):
    out = tmp_path / "run"
    done = _run(tmp_path, "carp", out, "--epochs", "1", "--checkpoint-minutes", "0.0001")
    assert done.returncode == 0, done.stderr[-3000:]
    # Every optimizer step is due: steps 1-3 write inside the epoch, the 4th leaves its write to
    # the epoch's own checkpoint. The two kept: the epoch's end and the step before it.
    kept = sorted((torch.load(f, weights_only=False) for f in out.glob("checkpoint*.pth")),
                  key=lambda state: (state["epoch"], state["batch"]))
    assert [(state["epoch"], state["batch"]) for state in kept] == [(0, 6), (1, 0)]


@pytest.mark.parametrize("backend", ["torchvision", "dali"])
@pytest.mark.parametrize("skips_exactly", [True, False])
def test_an_epoch_started_at_batch_b_has_the_uninterrupted_batches(backend, skips_exactly):
    """`set_epoch(e, start_batch=b)`: batches b.. of epoch e, equal to those of a whole epoch, whether
    the loader skips the images (per-image seeds) or produces and drops the first b batches."""
    import numpy as np

    from carp_fast.pipelines import ArraySource, MultiCropConfig, pretrain_loader
    from carp_fast.pipelines.loaders import dali_available

    if backend == "dali" and not dali_available():
        pytest.skip("DALI is not installed")  # it is in setup.sh's environment: this runs in CI
    images = np.random.default_rng(0).integers(0, 256, (40, 28, 28, 3), dtype=np.uint8)
    crops = MultiCropConfig(global_size=16, local_size=8, local_crops=1)
    loader = pretrain_loader(ArraySource(images, np.zeros(40, dtype=np.int64)), crops, batch_size=8,
                             backend=backend, workers=1, seed=5)
    loader.skips_exactly = skips_exactly and backend == "torchvision"
    loader.set_epoch(2)
    whole = list(loader)
    loader.set_epoch(2, start_batch=3)
    tail = list(loader)
    assert len(whole) == 5 and len(tail) == 2
    for a, b in zip(whole[3:], tail):
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert loader.epoch == 3 and loader.start_batch == 0  # the next epoch starts at its beginning
    with pytest.raises(ValueError, match="start_batch must be in \\[0, 5\\]"):
        loader.set_epoch(0, start_batch=6)


def test_signals_are_recorded_and_the_third_aborts():
    cb = Preemption(signals=("SIGUSR1",))
    cb._previous = {signal.SIGUSR1: signal.signal(signal.SIGUSR1, cb._handle)}
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGUSR1)
        assert cb.received == ["SIGUSR1", "SIGUSR1"]  # recorded, nothing raised: the step goes on
        with pytest.raises(KeyboardInterrupt, match="aborted without a checkpoint"):
            for _ in range(ABORT_AFTER):
                os.kill(os.getpid(), signal.SIGUSR1)
    finally:
        cb.release()
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


def test_bad_signal_names_and_minutes_are_refused():
    with pytest.raises(ValueError, match="unknown signal names \\['SIGNOPE'\\]"):
        Preemption(signals=("SIGNOPE",))
    with pytest.raises(ValueError, match="minutes must be > 0"):
        Preemption(minutes=0)


@pytest.mark.slow
def test_a_diverging_run_exits_3_with_one_true_line(tmp_path):
    """`--base-lr 1e6` makes the loss non-finite before any checkpoint: exit status 3, one error line
    that says no checkpoint exists (it used to call "the last checkpoint" the last good state)."""
    recipe, options = METHODS["carp"]
    cmd = [sys.executable, str(REPO / "recipes" / f"{recipe}.py"), *COMMON, *options, "--epochs", "1",
           "--base-lr", "1e6", "--final-lr", "0", "--out", str(tmp_path / "run")]
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)
    assert run.returncode == 3, run.stderr[-3000:]
    errors = [line for line in run.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "loss is nan" in errors[0] and "no checkpoint has been written yet" in errors[0]
    assert "Traceback" not in run.stderr


def test_a_fit_that_raises_puts_the_signal_handlers_back(tiny_dls, tiny_config, tmp_path):
    """fastai skips after_fit when fit raises; the PretrainLearner still restores the handlers, or a
    later Ctrl-C in the same notebook would only be recorded."""
    from fastai.callback.core import Callback

    from carp_fast.callbacks import Checkpointer
    from carp_fast.carp import carp_learner

    class Fail(Callback):
        def after_batch(self):
            raise RuntimeError("boom")

    before = signal.getsignal(signal.SIGINT)
    learn = carp_learner(tiny_dls, tiny_config, cbs=[Checkpointer(tmp_path, {}), Preemption(), Fail()], progress=False)
    with pytest.raises(RuntimeError, match="boom"):
        learn.fit(1)
    assert signal.getsignal(signal.SIGINT) is before
