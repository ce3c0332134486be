"""Checkpoint files (issue 23): only finite states written, atomically, the newest `keep` kept
with a checksum; --resume takes the newest that verifies; a full disk and a torn metrics line
are one warning or error line each."""

import dataclasses
import errno
import json
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import carp_fast.checkpoint as checkpoint
from carp_fast.checkpoint import CheckpointError, DiskFullError, NonFiniteStateError

REPO = Path(__file__).resolve().parents[1]


class _FakeLearn:
    "The minimum save_checkpoint and restore_checkpoint read."

    def __init__(self, weight: float = 1.0):
        self.model = torch.nn.Linear(4, 2)
        torch.nn.init.constant_(self.model.weight, weight)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.1, momentum=0.9)
        self.train_iter = 0


def _save(path, epoch, learn=None, **kw):
    learn = learn or _FakeLearn(float(epoch))
    return checkpoint.save_checkpoint(learn, path, next_epoch=epoch, settings={}, **kw)


def _epochs(folder):
    "{file name: epoch} of every checkpoint file in folder, as torch.load reads it."
    return {p.name: torch.load(p, weights_only=False)["epoch"] for p in sorted(folder.glob("checkpoint*.pth"))}


@pytest.fixture
def small_config(tiny_config):
    "tiny_config on resnet10_tiny: a few seconds an epoch."
    return dataclasses.replace(tiny_config, arch="resnet10_tiny")


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("warning:")]


def test_the_newest_two_are_kept_and_torch_load_reads_them(tmp_path):
    path = tmp_path / "checkpoint.pth"
    for epoch in (1, 2, 3):
        _save(path, epoch)
    assert _epochs(tmp_path) == {"checkpoint.pth": 3, "checkpoint.1.pth": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.1.pth", "checkpoint.pth"]  # no tmp, no sidecar
    for epoch in (4, 5, 6):
        _save(path, epoch, keep=3)
    assert _epochs(tmp_path) == {"checkpoint.pth": 6, "checkpoint.1.pth": 5, "checkpoint.2.pth": 4}
    _save(path, 7, keep=1)  # a smaller keep removes the older ones
    assert _epochs(tmp_path) == {"checkpoint.pth": 7}
    assert checkpoint.verify_checkpoint(path) == {"sha256": checkpoint.verify_checkpoint(path)["sha256"], "epoch": 7, "batch": 0}


def test_batch_is_stored_and_restored(tmp_path):
    _save(tmp_path / "checkpoint.pth", 2, batch=5)
    learn = _FakeLearn()
    checkpoint.restore_checkpoint(learn, checkpoint.load_checkpoint(tmp_path / "checkpoint.pth"))
    assert (learn.first_epoch, learn.first_batch) == (2, 5)


def _truncate(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _empty(p):
    p.write_bytes(b"")


def _flip(p):
    data = bytearray(p.read_bytes())
    for i in range(len(data) // 3, len(data) // 3 + 100):  # inside the tensors: torch.load reads them silently
        data[i] ^= 0xFF
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("damage, why", [(_truncate, "truncated"), (_empty, "empty"), (_flip, "checksum mismatch")])
def test_a_damaged_checkpoint_is_detected(tmp_path, damage, why):
    path = tmp_path / "checkpoint.pth"
    _save(path, 1)
    damage(path)
    with pytest.raises(CheckpointError, match=why):
        checkpoint.verify_checkpoint(path)
    with pytest.raises(CheckpointError) as error:  # the only one: one line naming it, no torch error
        checkpoint.load_checkpoint(path)
    message = str(error.value)
    assert "\n" not in message and "checkpoint.pth" in message and why in message and "central directory" not in message


def test_a_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path, capfd):
    path = tmp_path / "checkpoint.pth"
    _save(path, 1)
    _save(path, 2)
    _truncate(path)
    found, state = checkpoint.load_newest_checkpoint(path)
    assert found == tmp_path / "checkpoint.1.pth" and state["epoch"] == 1
    (line,) = _warnings(capfd.readouterr().err)  # one line, naming the file and why
    assert "skipping checkpoint" in line and str(path) in line and "truncated" in line
    assert (tmp_path / "checkpoint.pth.bad").exists() and not path.exists()  # set aside
    _save(path, 2)  # the next save keeps the good one as the previous
    assert _epochs(tmp_path) == {"checkpoint.pth": 2, "checkpoint.1.pth": 1}


def test_a_damaged_checkpoint_with_resume_is_one_error_line(tmp_path, capsys):
    from tests.test_train import run_cli

    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pth").write_bytes(b"")
    with pytest.raises(SystemExit) as stop:
        run_cli(out, "--epochs", "1", "--resume")
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and "checkpoint.pth: empty (0 bytes)" in err[-1] and "Traceback" not in "\n".join(err)


def test_a_stale_temporary_file_is_removed_with_a_note(tmp_path, capfd):
    path = tmp_path / "checkpoint.pth"
    _save(path, 1)
    (tmp_path / "checkpoint.pth.tmp").write_bytes(b"PK\x03\x04half a checkpoint")
    (tmp_path / "checkpoint.tmp").write_bytes(b"older versions' name")
    assert checkpoint.load_checkpoint(path)["epoch"] == 1
    assert not (tmp_path / "checkpoint.pth.tmp").exists() and not (tmp_path / "checkpoint.tmp").exists()
    notes = _warnings(capfd.readouterr().err)
    assert len(notes) == 2 and all("unfinished checkpoint" in n for n in notes)


def test_a_checkpoint_without_checksum_loads_with_a_note(tmp_path, capfd):
    _save(tmp_path / "new.pth", 3)
    torch.save(torch.load(tmp_path / "new.pth", weights_only=False), tmp_path / "checkpoint.pth")  # as before issue 23
    assert checkpoint.load_checkpoint(tmp_path / "checkpoint.pth")["epoch"] == 3
    assert "no checksum" in capfd.readouterr().err


def _enospc_write(monkeypatch, after: int):
    "Every write fails with ENOSPC once `after` bytes are written (a disk that fills up)."
    write = checkpoint._HashingFile.write

    def full(self, data):
        if self.written + memoryview(data).nbytes > after:
            raise OSError(errno.ENOSPC, "No space left on device")
        return write(self, data)

    monkeypatch.setattr(checkpoint._HashingFile, "write", full)


def _unexpected_pos(monkeypatch, after: int):
    "torch's file writer's error when fwrite stops short."
    save = torch.save

    def short(state, f, *args, **kw):
        f.write(b"x" * after)
        raise RuntimeError(f"[enforce fail at inline_container.cc:778] . unexpected pos {after + 64} vs {after}")

    monkeypatch.setattr(checkpoint.torch, "save", short)
    return save


@pytest.mark.parametrize("fill", [_enospc_write, _unexpected_pos])
def test_a_full_disk_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fill):
    path = tmp_path / "checkpoint.pth"
    _save(path, 1)
    _save(path, 2)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    fill(monkeypatch, after=300)
    with pytest.raises(DiskFullError) as error:
        _save(path, 3)
    monkeypatch.undo()
    message = str(error.value)
    assert error.value.errno == errno.ENOSPC and "\n" not in message
    assert message.startswith("the disk is full") and str(tmp_path) in message and " free" in message and "is unchanged" in message
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no tmp left, nothing rotated
    assert checkpoint.load_checkpoint(path)["epoch"] == 2


def test_nan_weights_are_never_written_and_the_error_names_what_exists(tmp_path):
    path = tmp_path / "checkpoint.pth"
    with pytest.raises(NonFiniteStateError, match="no checkpoint has been written yet"):
        _save(path, 1, _FakeLearn(float("nan")))
    assert not list(tmp_path.iterdir())

    learn = _FakeLearn()
    _save(path, 1, learn)
    written = path.read_bytes()
    with torch.no_grad():
        learn.model.bias[0] = float("inf")
    with pytest.raises(NonFiniteStateError) as error:
        _save(path, 2, learn)
    message = str(error.value)
    assert "model.bias" in message and f"the newest good checkpoint is {path} (--resume continues at epoch 1)" in message
    assert "Lower the learning rate" in message
    assert path.read_bytes() == written and not (tmp_path / "checkpoint.1.pth").exists()


def test_a_non_finite_optimizer_state_is_never_written(tmp_path):
    learn = _FakeLearn()
    learn.model(torch.ones(1, 4)).sum().backward()
    learn.opt.step()  # SGD's momentum buffers exist
    next(iter(learn.opt.state.values()))["momentum_buffer"].fill_(float("nan"))
    with pytest.raises(NonFiniteStateError, match="opt.state.0.momentum_buffer"):
        _save(tmp_path / "checkpoint.pth", 1, learn)
    assert not (tmp_path / "checkpoint.pth").exists()


def test_a_nan_checkpoint_from_before_is_skipped_on_resume(tmp_path, capfd):
    path = tmp_path / "checkpoint.pth"
    _save(path, 1)
    state = torch.load(path, weights_only=False)
    state["model"]["weight"].fill_(float("nan"))
    checkpoint.write_checkpoint(state | {"epoch": 2}, path)  # as an older carp_fast wrote it
    found, state = checkpoint.load_newest_checkpoint(path)
    assert found.name == "checkpoint.1.pth" and state["epoch"] == 1
    assert "NaN or infinite" in capfd.readouterr().err


def test_nan_weights_at_an_epoch_end_stop_the_run_with_the_good_checkpoint_kept(tiny_dls, small_config, tmp_path):
    # The case: the epoch's last update makes the weights NaN while its losses were finite.
    from fastai.callback.core import Callback

    from carp_fast.callbacks import Checkpointer, NonFiniteError, NonFiniteStateError
    from carp_fast.carp import carp_learner

    class PoisonWeights(Callback):
        def after_step(self):
            if self.learn.train_iter == 7:  # the last step of epoch 1 (4 an epoch)
                with torch.no_grad():
                    next(self.learn.model.parameters()).fill_(float("nan"))

    learn = carp_learner(tiny_dls, small_config, cbs=[Checkpointer(tmp_path, {}), PoisonWeights()], progress=False)
    with pytest.raises(NonFiniteStateError) as error:
        learn.fit(3)
    assert isinstance(error.value, NonFiniteError)
    assert f"{tmp_path / 'checkpoint.pth'} (--resume continues at epoch 1)" in str(error.value)
    assert _epochs(tmp_path) == {"checkpoint.pth": 1}  # the NaN state was not written


def test_a_nan_loss_before_any_checkpoint_says_none_exists(tiny_dls, small_config, tmp_path):
    # `--base-lr 1e6`: the loss is NaN in the first epoch, before any checkpoint.
    from fastai.callback.core import Callback

    from carp_fast.callbacks import Checkpointer, NonFiniteError, NonFiniteLossError
    from carp_fast.carp import carp_learner

    class PoisonStep(Callback):
        def after_pred(self):
            if self.learn.train_iter == 1:
                self.learn.pred = self.learn.pred._replace(student=self.learn.pred.student * float("nan"))

    learn = carp_learner(tiny_dls, small_config, cbs=[Checkpointer(tmp_path, {}), PoisonStep()], progress=False)
    with pytest.raises(NonFiniteLossError, match="no checkpoint has been written yet") as error:
        learn.fit(2)
    assert isinstance(error.value, NonFiniteError) and "last good state" not in str(error.value)
    assert not (tmp_path / "checkpoint.pth").exists()


def test_a_torn_metrics_line_is_dropped_and_the_file_stays_continuous(tiny_dls, small_config, tmp_path, capfd):
    from carp_fast.callbacks import Checkpointer, MetricsLogger
    from carp_fast.carp import carp_learner

    def learner(resume):
        cbs = [MetricsLogger(tmp_path, tensorboard=False), Checkpointer(tmp_path, {}, resume=resume)]
        return carp_learner(tiny_dls, small_config, cbs=cbs, progress=False)

    learner(False).fit(2)
    metrics = tmp_path / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"epoch": 2, "step": 12, "lo')  # killed while writing a line
    _truncate(tmp_path / "checkpoint.pth")  # and the newest checkpoint is damaged: resume at epoch 1
    capfd.readouterr()
    learner(True).fit(2)
    assert [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] == [0, 1]
    warnings = _warnings(capfd.readouterr().err)
    assert len(warnings) == 2
    assert any("skipping checkpoint" in w for w in warnings)
    assert any(str(metrics) in w and "torn last line" in w for w in warnings)


_WRITER = textwrap.dedent(
    """
    import sys, torch
    import carp_fast.checkpoint as checkpoint
    path = sys.argv[1]
    for i in range(1, 10_000):  # 48 MB each, until killed
        state = {"epoch": i, "model": {"w": torch.full((12_000_000,), float(i))}, "opt": {}, "train_iter": i, "rng": [], "settings": {}}
        checkpoint.write_checkpoint(state, path)
    """
)


def test_a_kill_during_a_write_leaves_a_readable_checkpoint(tmp_path):
    path = tmp_path / "checkpoint.pth"
    tmp = tmp_path / "checkpoint.pth.tmp"
    for attempt in range(2):  # a kill early and late in a write
        proc = subprocess.Popen([sys.executable, "-c", _WRITER, str(path)], cwd=REPO, stderr=subprocess.PIPE)
        deadline = time.time() + 300
        while not (path.exists() and tmp.exists() and tmp.stat().st_size > (0 if attempt == 0 else 24_000_000)):
            assert proc.poll() is None and time.time() < deadline, proc.stderr.read()
            time.sleep(0.001)
        proc.send_signal(signal.SIGKILL)  # while the tmp is being written
        proc.wait()
        for candidate in checkpoint.checkpoint_paths(path):  # each one kept is complete
            record = checkpoint.verify_checkpoint(candidate)
            state = torch.load(candidate, weights_only=False)
            assert state["epoch"] == record["epoch"] and torch.all(state["model"]["w"] == float(record["epoch"]))
        state = torch.load(checkpoint.load_newest_checkpoint(path)[0], weights_only=False)
        assert state["epoch"] >= 1 and not tmp.exists()


def test_a_checkpoint_from_before_a_setting_existed_resumes_as_that_settings_old_value():
    from carp_fast.checkpoint import check_same_run

    old = {"arch": "resnet10_tiny", "seed": 0}  # written before eval_on, teacher and lambda_e existed
    check_same_run(old, {**old, "eval_on": "test", "teacher": True, "entropy_weight": 1.0,
                         "final_entropy_weight": None, "linear_probe": True}, "old.pth")
    for changed in ({"eval_on": "validation"}, {"teacher": False}, {"entropy_weight": 2.0}):
        with pytest.raises(ValueError, match=next(iter(changed))):
            check_same_run(old, {**old, **changed}, "old.pth")  # a run that trains otherwise is refused
