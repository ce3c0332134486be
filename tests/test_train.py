"""Runs through the recipes: outputs, bad input, export, command line (resume after kill -9:
test_resume_after_kill.py)."""

import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from carp_fast.carp import CARPConfig
from carp_fast.options import build_parser
from carp_fast.recipes import fashion_mnist
from carp_fast.run import TrainSettings

REPO = Path(__file__).resolve().parents[1]
# A Fashion-MNIST run of a few seconds per epoch on 2 CPU cores.
SMALL = [
    "--arch", "resnet10_tiny", "--n-prototypes", "128", "--block-size", "16", "--hidden-dim", "64", "--embed-dim", "32",
    "--batch-size", "64", "--global-batch", "64", "--train-images", "384", "--knn-bank", "600", "--knn-queries", "300",
    "--knn-every", "1", "--workers", "1", "--log-every", "2", "--precision", "fp32", "--no-progress",
]


def run_cli(out, *extra):
    return fashion_mnist.main([*SMALL, "--out", str(out), *extra])


def test_run_writes_metrics_tensorboard_checkpoint_and_export(tmp_path):
    summary = run_cli(tmp_path, "--epochs", "2", "--knn-random-init")
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "final" not in line]
    assert [r["epoch"] for r in lines] == [0, 1]
    for r in lines:
        assert {"epoch", "step", "loss", "consistency", "entropy", "lr", "momentum", "images_per_s", "knn_top1"} <= set(r)
        assert r["loss"] == pytest.approx(r["consistency"] + r["entropy"], rel=1e-5)
    assert lines[1]["step"] == 2 * (384 // 64)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert state["epoch"] == 2 and state["train_iter"] == 12 and "opt" in state and "rng" in state
    assert state["settings"]["arch"] == "resnet10_tiny"
    saved = json.loads((tmp_path / "summary.json").read_text())
    final = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])  # all k-NN numbers side by side
    assert final["final"] and saved["knn_top1"] == final["knn_top1"] == lines[-1]["knn_top1"]
    for key in ("knn_top1_random_init", "knn_top1_raw_pixels"):
        assert saved[key] == final[key] and 0 <= saved[key] <= 100
    assert summary["epochs_run"] == 2

    from carp_fast.backbones import build_backbone

    backbone = build_backbone("resnet10_tiny")
    backbone.load_state_dict(torch.load(tmp_path / "backbone_teacher.pth", weights_only=True))  # strict
    teacher = {k.removeprefix("teacher.backbone."): v for k, v in state["model"].items() if k.startswith("teacher.backbone.")}
    assert all(torch.equal(v, teacher[k]) for k, v in backbone.state_dict().items())


def test_resnet50_export_loads_into_torchvision(tmp_path):
    import torchvision

    from carp_fast.export import export_backbone
    from carp_fast.carp import CARPStudentTeacher

    model = CARPStudentTeacher("resnet50", n_prototypes=32, block_size=8, hidden_dim=16, embed_dim=8)
    export_backbone(model, tmp_path / "b.pth", arch="resnet50")
    missing, unexpected = torchvision.models.resnet50().load_state_dict(torch.load(tmp_path / "b.pth"), strict=False)
    assert sorted(missing) == ["fc.bias", "fc.weight"] and not unexpected


@pytest.mark.slow
def test_minutes_plan_the_whole_run_and_the_schedule_completes(tmp_path, capsys):
    """--minutes sizes the run to the budget (evaluation included) instead of cutting it."""
    budget_s = 40.0
    start = time.time()
    # Epochs of ~190 steps: after each one the pace is measured again, the loader's restart
    # included, and the plan resized to it (the schedule still completes). "plan: N" is also in
    # the last "re-plan: N" line.
    summary = run_cli(tmp_path, "--epochs", "1000", "--minutes", str(budget_s / 60), "--knn-random-init", "--knn-every", "0",
                      "--batch-size", "16", "--global-batch", "16", "--base-lr", "2e-3", "--final-lr", "1e-4",
                      "--train-images", "3072", "--checkpoint-every", "100")
    took = time.time() - start
    plan = summary["plan"]
    assert f"plan: {plan['steps']} steps of batch 16" in capsys.readouterr().out
    assert summary["steps_run"] == plan["steps"] > 7 and summary["epochs_run"] == plan["epochs"] < 1000
    assert not summary["stopped_early"] and took < budget_s + 8  # a loaded CI machine: some slack
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if "final" not in line]
    # The cosine ran to its end over the planned steps: written from the official schedule
    # final + (peak - final) (1 + cos(pi s / S)) / 2 at the last step s = S - 1.
    peak, final, steps = 2e-3 * 16 / 256, 1e-4, plan["steps"]
    expected = final + (peak - final) * (1 + math.cos(math.pi * (steps - 1) / steps)) / 2
    assert lines[-1]["lr_last_step"] == pytest.approx(expected, rel=1e-5)


# bad input: each a clear error before the first step ---------------------------------------


@pytest.mark.parametrize(
    "extra,match",
    [
        (["--data", "/no/such/folder"], "/no/such/folder"),
        (["--data", "EMPTY"], "no class folders"),
        (["--train-images", "32"], "fewer than one global batch"),
        (["--global-batch", "100"], "global_batch=100"),
        (["--block-size", "256"], "block_size"),
        (["--base-lr", "-0.1"], "base_lr"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--global-scale", "0.5", "0.2"], "crop scales"),
        (["--resume"], "no checkpoint"),
    ],
)
def test_a_bad_setting_is_one_error_line_and_exit_2(tmp_path, capsys, extra, match):
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if x == "EMPTY" else x for x in extra]
    with pytest.raises(SystemExit) as stop:
        run_cli(tmp_path / "run", "--epochs", "1", *extra)
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "error:" in err[-1] and match in err[-1] and "Traceback" not in "\n".join(err)
    assert not (tmp_path / "run" / "checkpoint.pth").exists()


def test_resume_with_another_configuration_is_refused(tmp_path, capsys):
    from carp_fast.checkpoint import save_checkpoint

    from carp_fast.options import parse_settings

    settings, config = parse_settings((TrainSettings, CARPConfig), fashion_mnist.DEFAULTS, [*SMALL, "--out", str(tmp_path)])
    other = {**settings.__dict__, **config.to_dict(), "block_size": 32}

    class FakeLearn:  # the minimum save_checkpoint reads
        model = torch.nn.Linear(1, 1)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        train_iter = 0

    save_checkpoint(FakeLearn(), tmp_path / "checkpoint.pth", next_epoch=1, settings=other)
    with pytest.raises(SystemExit):
        run_cli(tmp_path, "--epochs", "2", "--resume")
    assert "block_size: checkpoint 32 vs now 16" in capsys.readouterr().err


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_dls, tiny_config, tmp_path):
    from fastai.callback.core import Callback

    from carp_fast.callbacks import Checkpointer, NonFiniteLossError
    from carp_fast.carp import carp_learner

    class PoisonStep(Callback):
        def after_pred(self):
            if self.learn.train_iter == 6:  # the 7th step: epoch 1, step 3 of 4
                self.learn.pred = self.learn.pred._replace(student=self.learn.pred.student * float("nan"))

    learn = carp_learner(tiny_dls, tiny_config, cbs=[Checkpointer(tmp_path, {}), PoisonStep()], progress=False)
    with pytest.raises(NonFiniteLossError, match="optimizer step 7 \\(micro-batch 7\\) \\(epoch 1\\)"):
        learn.fit(3)
    assert torch.load(tmp_path / "checkpoint.pth", weights_only=False)["epoch"] == 1


def test_help_lists_every_setting_with_its_default(capsys):
    parser = build_parser((TrainSettings, CARPConfig), fashion_mnist.DEFAULTS)
    text = parser.format_help()
    for option in ("--batch-size", "--block-size", "--n-prototypes", "--epochs", "--minutes", "--resume", "--no-sync-bn", "--local-crops"):
        assert option in text
    assert "(default: 1024)" in text  # the recipe's K, not CARPConfig's
    with pytest.raises(ValueError, match="unknown settings"):
        build_parser((TrainSettings, CARPConfig), {"batch_sise": 3})


def test_console_command_help():
    out = subprocess.run([sys.executable, "-m", "carp_fast.cli", "train", "--help"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--global-batch" in out.stdout
    out = subprocess.run([sys.executable, "-m", "carp_fast.cli", "train", "--recipe", "in1k_massl", "--help"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "--memory-size" in out.stdout and "--data" in out.stdout
    out = subprocess.run([sys.executable, "-m", "carp_fast.cli", "train", "--recipe", "in1k_mc"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "the following arguments are required: --data" in out.stderr
    out = subprocess.run([sys.executable, "-m", "carp_fast.cli", "train", "--recipe", "nope"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and "no recipe 'nope'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "carp_fast.cli"], capture_output=True, text=True, timeout=300)
    assert "bench-data" in out.stdout and "eval" in out.stdout
