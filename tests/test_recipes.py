"""Each recipe runs as a user launches it, with its own model and crops; only the budget is small.

`accelerate launch recipes/in1k_mc.py --data DIR` is the product's entry point: ResNet-50,
K = 65,536, 2 x 224 + 6 x 96 crops, on a generated ImageNet-layout JPEG folder, for two
optimizer steps of 2 x 2 images.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from carp_fast.pipelines.make_jpeg_folder import make_jpeg_folder

REPO = Path(__file__).resolve().parents[1]
ACCELERATE = str(Path(sys.executable).parent / "accelerate")
# --device cpu: an ImageNet recipe without CUDA stops unless the CPU is asked for (carp_fast.device)
SMALL_BUDGET = ["--epochs", "1", "--batch-size", "2", "--global-batch", "4", "--workers", "1", "--knn-bank", "8", "--knn-queries", "4",
                "--device", "cpu"]


@pytest.fixture(scope="module")
def imagenet_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("imagenet")
    make_jpeg_folder(root / "train", classes=2, per_class=4, seed=0)
    make_jpeg_folder(root / "val", classes=2, per_class=2, seed=1)
    return root


def launch(*args, env=None, timeout=600):
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=REPO, env={**os.environ, **(env or {})})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("recipe, arch, crops", [("in1k_mc", "resnet50", 8), ("in1k_massl", "vit_small", 12)])
def test_imagenet_recipe_runs_as_launched(imagenet_folder, tmp_path, recipe, arch, crops):
    launch(ACCELERATE, "launch", f"recipes/{recipe}.py", "--data", str(imagenet_folder), "--out", str(tmp_path), *SMALL_BUDGET)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs_run"] == 1 and 0 <= summary["knn_top1"] <= 100
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    settings = state["settings"]
    assert settings["arch"] == arch and settings["global_size"] == 224 and settings["local_size"] == 96
    assert settings["global_crops"] + settings["local_crops"] == crops
    assert state["train_iter"] == 4  # 8 images, micro-batches of 2
    if recipe == "in1k_mc":
        assert state["model"]["student.prototypes.weight"].shape == (65536, 256)
    else:
        assert state["model"]["memory.embeddings"].shape == (131072, 256)
    assert (tmp_path / "backbone_teacher.pth").exists()


@pytest.mark.slow
def test_two_crop_recipe_runs_by_name(imagenet_folder, tmp_path):
    launch(sys.executable, "-m", "carp_fast.cli", "train", "--recipe", "in1k", "--data", str(imagenet_folder),
           "--out", str(tmp_path), *SMALL_BUDGET, "--no-progress")
    settings = torch.load(tmp_path / "checkpoint.pth", weights_only=False)["settings"]
    assert settings["local_crops"] == 0 and settings["arch"] == "resnet50" and settings["n_prototypes"] == 65536


@pytest.mark.slow
def test_readme_two_process_command_runs_as_written(tmp_path):
    """README: `ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 recipes/fashion_mnist.py`,
    with a small budget: the per-process batch follows from the global batch of 128."""
    out = launch(ACCELERATE, "launch", "--multi_gpu", "--num_processes", "2", "recipes/fashion_mnist.py", "--out", str(tmp_path),
                 "--epochs", "1", "--train-images", "1024", "--knn-bank", "500", "--knn-queries", "200", "--workers", "1",
                 "--no-knn-random-init", env={"ACCELERATE_USE_CPU": "1"})
    assert "batch_size 128 -> 64 per process" in out.stdout
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert state["settings"]["batch_size"] == 64 and state["settings"]["global_batch"] == 128
    assert state["train_iter"] == 8  # 1024 images / 128 per optimizer step, no accumulation
