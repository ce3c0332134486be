"""The run's folder (--out, carp_fast.run_folder): a live run's lock refuses a second run naming it,
a dead run's lock does not block, another run's files are never overwritten silently (refused
without --resume or --overwrite; --overwrite deletes exactly them), --out naming a file is one line."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carp_fast import run_folder
from tests.test_train import REPO, SMALL, run_cli

FAST = ["--knn-every", "0", "--no-knn-random-init"]  # no k-NN monitor: the shortest real run


def _refused(capsys, out, *extra) -> str:
    """Run the recipe on ``out``; it must stop with exit 2 and one error line, which is returned."""
    with pytest.raises(SystemExit) as stop:
        run_cli(out, *FAST, *extra)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and "Traceback" not in "\n".join(err)
    return err[-1]


def _listing(folder):
    return {p.relative_to(folder): p.read_bytes() if p.is_file() else None for p in sorted(folder.rglob("*"))}


def _wait_for(condition, proc, seconds=600):
    deadline = time.time() + seconds
    while not condition():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.05)


def _holder_pid(out):
    try:
        return json.loads((out / ".lock").read_text())["pid"]
    except (OSError, ValueError, KeyError):
        return None


@pytest.mark.slow
def test_a_second_run_on_a_live_folder_is_refused_and_a_killed_runs_lock_does_not_block(tmp_path, capsys):
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, str(REPO / "recipes" / "fashion_mnist.py"), *SMALL, *FAST, "--out", str(out),
                              "--epochs", "1000"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _holder_pid(out) == first.pid, first)
        for extra in ([], ["--resume"], ["--overwrite"]):  # the lock comes first, whatever the options
            line = _refused(capsys, out, "--epochs", "1", *extra)
            assert "in use by a live run" in line and f"pid {first.pid}" in line and socket.gethostname() in line
        _wait_for(lambda: (out / "checkpoint.pth").exists(), first)  # an epoch written, then kill -9
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    # The OS dropped the dead run's lock (its DataLoader worker kept no copy): --resume goes on.
    epochs = torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] + 1
    summary = run_cli(out, *FAST, "--epochs", str(epochs), "--resume")
    assert summary["epochs_run"] == epochs and torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == epochs


def test_a_dead_process_lock_does_not_block(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from carp_fast import run_folder; run_folder.claim(sys.argv[1]); "
                               "print('held', flush=True); time.sleep(600)", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held", holder.stderr.read()
        with pytest.raises(ValueError, match=re.escape(f"in use by a live run (host {socket.gethostname()}, pid {holder.pid}, since ")):
            run_folder.claim(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert json.loads((out / ".lock").read_text())["pid"] == holder.pid  # the file stays, naming its last holder
    run_folder.claim(out)  # but its lock went with the process
    try:
        assert json.loads((out / ".lock").read_text())["pid"] == os.getpid()
        run_folder.claim(out)  # this process holds it already: a second run in it (a notebook) goes on
    finally:
        run_folder.release(out)


def test_a_rerun_without_resume_is_refused_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "metrics.jsonl").write_text('{"epoch": 0, "loss": 1.0}\n')
    (out / "checkpoint.pth").write_bytes(b"the only copy of a week of training")
    before = _listing(out)
    line = _refused(capsys, out, "--epochs", "1")
    assert "holds another run's files (checkpoint.pth, metrics.jsonl, tensorboard/)" in line
    assert "--resume" in line and "--overwrite" in line
    after = _listing(out)
    assert after.pop(Path(".lock")) is not None and after == before  # nothing written but the lock


def test_overwrite_deletes_the_previous_runs_files_and_nothing_else(tmp_path):
    out = tmp_path / "run"
    (out / "tensorboard").mkdir(parents=True)
    (out / "tensorboard" / "events.out.tfevents.old").write_bytes(b"old")
    (out / "metrics.jsonl").write_text('{"epoch": 0, "loss": 1.0}\n{"epoch": 1, "loss": 0.5}\n')
    for name in ("checkpoint.pth", "checkpoint.tmp", "summary.json", "baselines.json", "backbone_teacher.pth"):
        (out / name).write_text("old")
    (out / "notes.txt").write_text("mine")
    run_cli(out, *FAST, "--epochs", "1", "--overwrite")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [0] and lines[0]["loss"] != 1.0  # the new run's only
    assert torch.load(out / "checkpoint.pth", weights_only=False)["epoch"] == 1
    assert not (out / "checkpoint.tmp").exists() and not (out / "baselines.json").exists()
    assert not (out / "tensorboard" / "events.out.tfevents.old").exists()
    assert json.loads((out / "summary.json").read_text())["epochs_run"] == 1
    assert (out / "notes.txt").read_text() == "mine"


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("a file")
    line = _refused(capsys, tmp_path / "run", "--epochs", "1")
    assert "error:" in line and "is a file, not a folder" in line
    line = _refused(capsys, tmp_path / "run" / "sub", "--epochs", "1")  # a parent that is a file
    assert "error:" in line and "cannot make the folder" in line
    assert (tmp_path / "run").read_text() == "a file"


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    line = _refused(capsys, tmp_path / "run", "--epochs", "1", "--resume", "--overwrite")
    assert "--resume and --overwrite exclude each other" in line and not (tmp_path / "run").exists()
