"""kill -9 after an epoch's checkpoint, then --resume: the same weights (and memory), the same
metrics, for every method's embedded recipe."""

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMMON = ["--batch-size", "64", "--global-batch", "64", "--train-images", "384", "--knn-bank", "600", "--knn-queries", "300",
          "--workers", "1", "--log-every", "2", "--precision", "fp32", "--no-progress", "--knn-every", "0",
          "--arch", "resnet10_tiny", "--hidden-dim", "64", "--embed-dim", "32"]
# Each method's recipe at a few seconds per epoch on 2 CPU cores, and the state only it keeps.
METHODS = {
    "carp": ("fashion_mnist.py", ["--n-prototypes", "128", "--block-size", "16"], set()),
    "massl": ("fashion_mnist_massl.py", ["--memory-size", "512", "--block-size", "64"], {"memory.embeddings", "memory.pointer"}),
    "carl": ("fashion_mnist_carl.py", ["--n-prototypes", "128"], set()),  # no teacher: the student only
}


def _launch(method, out, *extra):
    recipe, options, _ = METHODS[method]
    cmd = [sys.executable, str(REPO / "recipes" / recipe), *COMMON, *options, "--out", str(out), "--epochs", "3", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(METHODS))
def test_resume_after_kill_ends_with_the_same_weights(tmp_path, method):
    full, killed = tmp_path / "full", tmp_path / "killed"
    assert _launch(method, full).wait(timeout=600) == 0

    proc = _launch(method, killed)
    deadline = time.time() + 600
    while not (killed / "checkpoint.pth").exists():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() is not None else "timeout"
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert torch.load(killed / "checkpoint.pth", weights_only=False)["epoch"] == 1, "killed too late to test a resume"

    resumed = _launch(method, killed, "--resume")
    assert resumed.wait(timeout=600) == 0, resumed.stderr.read()[-3000:]
    a = torch.load(full / "checkpoint.pth", weights_only=False)
    b = torch.load(killed / "checkpoint.pth", weights_only=False)
    assert a["epoch"] == b["epoch"] == 3 and a["train_iter"] == b["train_iter"] == 3 * 384 // 64
    assert METHODS[method][2] <= set(a["model"])
    for key, value in a["model"].items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, b["model"][key]), key
    lines = lambda run: [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines(killed) if "loss" in r] == [0, 1, 2]  # no epoch lost or repeated
    assert len(lines(full)) == 4  # 3 epochs and the final k-NN line
    assert [r.get("loss") for r in lines(full)] == [r.get("loss") for r in lines(killed)]
