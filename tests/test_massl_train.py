"""MaSSL runs through its recipes: outputs, bad input, export, options (resume after kill -9:
test_resume_after_kill.py)."""

import json
from pathlib import Path

import pytest
import torch

from carp_fast.massl import MaSSLConfig
from carp_fast.options import build_parser, parse_settings
from carp_fast.recipes import fashion_mnist_massl, in1k_massl
from carp_fast.run import TrainSettings

REPO = Path(__file__).resolve().parents[1]
# A Fashion-MNIST MaSSL run of a few seconds per epoch on 2 CPU cores.
SMALL = [
    "--arch", "resnet10_tiny", "--memory-size", "512", "--block-size", "64", "--hidden-dim", "64", "--embed-dim", "32",
    "--batch-size", "64", "--global-batch", "64", "--train-images", "384", "--knn-bank", "600", "--knn-queries", "300",
    "--workers", "1", "--log-every", "2", "--precision", "fp32", "--no-progress",
]


def run_cli(out, *extra):
    return fashion_mnist_massl.main([*SMALL, "--out", str(out), *extra])


def test_run_writes_metrics_checkpoint_with_the_memory_and_export(tmp_path):
    summary = run_cli(tmp_path, "--epochs", "1", "--knn-every", "1", "--knn-random-init")
    line, final = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert final["final"] and final["knn_top1"] == line["knn_top1"]
    assert {"epoch", "step", "loss", "lr", "momentum", "teacher_temperature", "slots_hit", "knn_top1"} <= set(line)
    assert line["step"] == 384 // 64
    state = torch.load(tmp_path / "checkpoint.pth", weights_only=False)
    assert state["settings"]["memory_size"] == 512 and state["epoch"] == 1
    assert int(state["model"]["memory.pointer"]) == (6 * 64) % 512
    assert state["model"]["memory.embeddings"].shape == (512, 32)
    assert {"knn_top1", "knn_top1_random_init"} <= set(summary)

    from carp_fast.backbones import build_backbone

    backbone = build_backbone("resnet10_tiny")
    backbone.load_state_dict(torch.load(tmp_path / "backbone_teacher.pth", weights_only=True))  # strict


def test_vit_export_loads_into_timm_strictly(tmp_path):
    import timm

    from carp_fast.export import export_backbone
    from carp_fast.massl import MaSSLConfig, build_model

    model = build_model(MaSSLConfig(arch="vit_small", memory_size=64, block_size=16, hidden_dim=16, embed_dim=8))
    export_backbone(model, tmp_path / "b.pth", arch="vit_small")
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0)
    vit.load_state_dict(torch.load(tmp_path / "b.pth", weights_only=True))  # strict
    assert torch.equal(vit.pos_embed, model.teacher.backbone.pos_embed)


def test_a_memory_that_the_batch_does_not_divide_is_a_clear_error_before_the_first_step(tmp_path):
    with pytest.raises(ValueError, match="K=500 must be a multiple of the images written per step"):
        run_cli(tmp_path, "--epochs", "1", "--memory-size", "500")
    assert not (tmp_path / "checkpoint.pth").exists()


def test_help_lists_the_massl_settings_with_the_recipe_defaults():
    text = build_parser((TrainSettings, MaSSLConfig), fashion_mnist_massl.DEFAULTS).format_help()
    for option in ("--memory-size", "--teacher-temperature-epochs", "--clip-grad", "--drop-path", "--final-lr"):
        assert option in text
    assert "(default: 4096)" in text  # the recipe's K, not MaSSLConfig's
    assert "--n-prototypes" not in text
    with pytest.raises(ValueError, match="unknown settings"):
        build_parser((TrainSettings, MaSSLConfig), {**fashion_mnist_massl.DEFAULTS, "n_prototypes": 3})


def test_the_imagenet_recipe_is_the_published_vit_s_run():
    settings, config = parse_settings((TrainSettings, MaSSLConfig), {**in1k_massl.DEFAULTS, "data": "fashion-mnist"}, [])
    assert isinstance(config, MaSSLConfig)
    assert (config.arch, config.memory_size, config.block_size, config.global_batch) == ("vit_small", 131072, 16384, 128)
    assert (config.base_lr, config.final_lr, config.warmup_epochs, config.weight_decay, config.final_weight_decay) == (5e-4, 1e-6, 0, 0.04, 0.4)
    assert (config.clip_grad, config.teacher_momentum, config.drop_path, config.teacher_temperature_epochs) == (3.0, 0.992, 0.1, 30)
    assert (settings.local_crops, settings.global_scale, settings.local_scale) == (10, (0.32, 1.0), (0.05, 0.32))
