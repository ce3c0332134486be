"""load_backbone reads MaSSL checkpoints: the official layout (safe loader), this project's, and
exported ViTs; the features are the class token of the same timm ViT built independently here."""

import argparse

import pytest
import torch

from carp_fast.eval.checkpoints import infer_arch, load_backbone, read_checkpoint


def reference_vit(seed: int):
    """A timm ViT-S/16 with random (not initial) weights, built directly with timm."""
    import timm

    torch.manual_seed(seed)
    vit = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return vit.eval()


def features(model, x):
    with torch.no_grad():
        return model(x)


def test_official_massl_checkpoint_loads_with_the_safe_loader(tmp_path):
    teacher, student = reference_vit(0), reference_vit(1)
    head = {"head.mlp.0.weight": torch.randn(8, 384), "head.mlp.0.bias": torch.zeros(8)}
    checkpoint = {
        # The published runs: the teacher is not DDP-wrapped, the student is.
        "teacher": {**{f"backbone.{k}": v for k, v in teacher.state_dict().items()}, **head},
        "student": {f"module.backbone.{k}": v for k, v in student.state_dict().items()},
        "optimizer": {}, "epoch": 800,
        "memory_bank": {"queue": torch.randn(256, 64), "queue_ptr": torch.zeros(1, dtype=torch.long)},
        "args": argparse.Namespace(arch="vit_small", patch_size=16, memory_size=131072),
        "fp16_scaler": {"scale": 1024.0},
    }
    path = tmp_path / "checkpoint.pth"
    torch.save(checkpoint, path)
    assert infer_arch(read_checkpoint(path)) == "vit_small"
    x = torch.randn(2, 3, 64, 64)  # 64 px: the position embeddings are interpolated, as for 96 px crops
    torch.testing.assert_close(features(load_backbone(path), x), features(teacher, x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(features(load_backbone(path, which="student"), x), features(student, x), rtol=1e-5, atol=1e-5)


def test_project_massl_checkpoint_and_exported_vit_load(tmp_path):
    teacher = reference_vit(2)
    state = {f"teacher.backbone.{k}": v for k, v in teacher.state_dict().items()}
    state["memory.embeddings"] = torch.randn(64, 8)
    torch.save({"model": state, "settings": {"arch": "vit_small"}}, tmp_path / "run.pth")
    torch.save(teacher.state_dict(), tmp_path / "backbone_teacher.pth")  # what the MaSSL export writes
    x = torch.randn(1, 3, 32, 48)
    for name in ("run.pth", "backbone_teacher.pth"):
        torch.testing.assert_close(features(load_backbone(tmp_path / name), x), features(teacher, x), rtol=1e-5, atol=1e-5)


def test_mean_pooled_vit_is_refused(tmp_path):
    state = dict(reference_vit(3).state_dict())
    state["fc_norm.weight"] = torch.ones(384)
    torch.save(state, tmp_path / "b.pth")
    with pytest.raises(ValueError, match="class token"):
        load_backbone(tmp_path / "b.pth")
