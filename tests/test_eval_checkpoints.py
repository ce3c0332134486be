"""load_backbone: this project's, the official code's and torchvision's layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

from carp_fast.backbones import build_backbone
from carp_fast.eval.checkpoints import backbone_state_dict, load_backbone


def _randomised(module: nn.Module, seed: int) -> nn.Module:
    """Every parameter and BN buffer random, so a wrong key mapping cannot pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn(tensor.shape, generator=g).abs() + 0.1)
    return module


class _Network(nn.Module):  # the shape of carp_fast.networks.CARPNetwork
    def __init__(self, arch: str, seed: int):
        super().__init__()
        self.backbone = _randomised(build_backbone(arch), seed)
        self.head = nn.Linear(self.backbone.feature_dim, 8)
        self.prototypes = nn.Linear(8, 16, bias=False)


class _StudentTeacher(nn.Module):
    def __init__(self, arch: str):
        super().__init__()
        self.student = _Network(arch, seed=1)
        self.teacher = _Network(arch, seed=2)


def _assert_same(backbone: nn.Module, reference: nn.Module):
    got, want = backbone.state_dict(), reference.state_dict()
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], msg=key)


@pytest.fixture(scope="module")
def model():
    return _StudentTeacher("resnet18_small")


@pytest.mark.parametrize("prefix", ["", "_orig_mod.", "module."])
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_project_checkpoint(tmp_path, model, prefix, which):
    state = {prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"model": state, "opt": {}, "config": {"arch": "resnet18_small"}}, tmp_path / "c.pth")
    backbone = load_backbone(tmp_path / "c.pth", which=which)  # arch read from the config
    _assert_same(backbone, getattr(model, which).backbone)
    assert not backbone.training


def test_compiled_submodule_keys(model):
    # torch.compile on the student alone puts _orig_mod. inside the key.
    state = {k.replace("student.", "student._orig_mod."): v for k, v in model.state_dict().items()}
    _assert_same(load_backbone({"model": state}, "resnet18_small", "student"), model.student.backbone)


def test_official_layout():
    # The paper's code saves {"student": sd, "teacher": sd} of DDP-wrapped networks:
    # module.backbone.<torchvision keys>, module.head.* with a weight-normalised last layer.
    teacher = _randomised(torchvision.models.resnet50(), seed=3)
    teacher.fc = nn.Identity()
    student = _randomised(torchvision.models.resnet50(), seed=4)
    student.fc = nn.Identity()

    def official(backbone):
        sd = {f"module.backbone.{k}": v for k, v in backbone.state_dict().items()}
        sd["module.head.mlp.0.weight"] = torch.randn(2048, 2048)
        sd["module.head.last_layer.weight_g"] = torch.ones(1024, 1)
        sd["module.head.last_layer.weight_v"] = torch.randn(1024, 256)
        return sd

    checkpoint = {"student": official(student), "teacher": official(teacher), "epoch": 400}
    state = backbone_state_dict(checkpoint, "teacher")
    assert set(state) == set(teacher.state_dict())  # every backbone key, nothing else
    _assert_same(load_backbone(checkpoint), teacher)  # arch defaults to resnet50
    _assert_same(load_backbone(checkpoint, which="student"), student)


def test_torchvision_state_dict(tmp_path):
    net = _randomised(torchvision.models.resnet18(), seed=5)
    torch.save(net.state_dict(), tmp_path / "tv.pth")  # includes fc.*: ignored
    backbone = load_backbone(tmp_path / "tv.pth", "resnet18", which="student")
    net.fc = nn.Identity()
    _assert_same(backbone, net)


def test_errors(tmp_path, model):
    sd = model.state_dict()
    with pytest.raises(ValueError, match="which must be one of"):
        load_backbone({"model": sd}, "resnet18_small", which="ema")
    with pytest.raises(ValueError, match="has no backbone"):
        load_backbone({"model": {"head.weight": torch.zeros(2)}}, "resnet18_small")
    missing = {k: v for k, v in sd.items() if k != "teacher.backbone.layer1.0.conv1.weight"}
    with pytest.raises(ValueError, match=r"missing \['layer1.0.conv1.weight'\]"):
        load_backbone({"model": missing}, "resnet18_small")
    extra = {**sd, "teacher.backbone.extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        load_backbone({"model": extra}, "resnet18_small")
    only_student = {k: v for k, v in sd.items() if k.startswith("student.")}
    with pytest.raises(ValueError, match="no teacher backbone; pass which='student'"):
        load_backbone({"model": only_student}, "resnet18_small")
    with pytest.raises(ValueError, match="trained with arch='resnet18_small'"):
        load_backbone({"model": sd, "config": {"arch": "resnet18_small"}}, "resnet50")
    with pytest.raises(ValueError, match="do not fit arch='resnet18'"):
        load_backbone({"model": sd}, "resnet18")  # 3x3 stem vs 7x7: shape mismatch
    with pytest.raises(ValueError, match="arch must be one of"):
        load_backbone({"model": sd}, "vit")
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_backbone(tmp_path / "nope.pth")


def test_training_checkpoint_with_rng_state(tmp_path, model):
    # carp_fast.checkpoint.save_checkpoint stores numpy's RNG state and "settings".
    import random

    import numpy as np

    state = {"model": model.state_dict(), "opt": {"state": []}, "epoch": 3,
             "rng": {"numpy": np.random.get_state(), "python": random.getstate(),
                     "torch": torch.get_rng_state()},
             "settings": {"arch": "resnet18_small", "global_scale": (0.2, 1.0)}}  # fmt: skip
    torch.save(state, tmp_path / "checkpoint.pth")
    _assert_same(load_backbone(tmp_path / "checkpoint.pth"), model.teacher.backbone)


def test_arbitrary_pickles_are_refused(tmp_path, model):
    torch.save({"model": model.state_dict(), "hook": print}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="pickles objects other than tensors"):
        load_backbone(tmp_path / "odd.pth", "resnet18_small")
    backbone = load_backbone(tmp_path / "odd.pth", "resnet18_small", weights_only=False)
    _assert_same(backbone, model.teacher.backbone)


def _official_checkpoint(teacher: nn.Module, student: nn.Module) -> dict:
    """The released layout: DDP-wrapped state dicts, a weight-normalised last layer, the
    run's argparse.Namespace, optimizer and fp16 scaler states."""
    import argparse

    def wrapped(backbone):
        sd = {f"module.backbone.{k}": v for k, v in backbone.state_dict().items()}
        sd["module.head.mlp.0.weight"] = torch.randn(64, 2048)
        sd["module.head.mlp.0.bias"] = torch.zeros(64)
        sd["module.head.last_layer.weight_g"] = torch.ones(32, 1)
        sd["module.head.last_layer.weight_v"] = torch.randn(32, 64)
        return sd

    args = argparse.Namespace(arch="resnet50", lr=0.6, min_lr=0.006, batch_size_per_gpu=256, use_fp16=True)
    return {"student": wrapped(student), "teacher": wrapped(teacher), "optimizer": {"state": {}, "param_groups": []},
            "epoch": 400, "args": args, "fp16_scaler": {"scale": 65536.0, "growth_tracker": 0}}  # fmt: skip


def test_released_checkpoint_loads_safely_and_matches_torchvision(tmp_path):
    torch.manual_seed(0)
    teacher, student = torchvision.models.resnet50(), torchvision.models.resnet50()
    for net in (teacher, student):
        net.fc = nn.Identity()
    with torch.no_grad():  # non-trivial BN statistics, so eval-mode features depend on them
        for module in teacher.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.1, 0.1)
                module.running_var.uniform_(0.5, 1.5)
    path = tmp_path / "checkpoint0399.pth"
    torch.save(_official_checkpoint(teacher, student), path)

    backbone = load_backbone(path)  # safe loader, arch defaults to resnet50, teacher
    reference = torchvision.models.resnet50()
    reference.fc = nn.Identity()
    state = {k[len("module.backbone."):]: v for k, v in torch.load(path, weights_only=False)["teacher"].items()
             if k.startswith("module.backbone.")}  # fmt: skip
    reference.load_state_dict(state)
    images = torch.randn(2, 3, 64, 80, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(backbone(images), reference.eval()(images))
        assert not torch.allclose(backbone(images), student.eval()(images))


class _RunConfig:  # any class other than argparse.Namespace
    def __init__(self):
        self.lr = 0.6


def test_safe_loader_still_refuses_other_objects(tmp_path):
    torch.save({"teacher": {}, "args": _RunConfig()}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="pickles objects other than tensors"):
        load_backbone(tmp_path / "other.pth")


@pytest.mark.parametrize("content", [b"hello, my notes\n", b""])
def test_not_a_checkpoint_names_the_file(tmp_path, content):
    (tmp_path / "notes.txt").write_bytes(content)
    with pytest.raises(ValueError, match="notes.txt' is not a readable torch checkpoint"):
        load_backbone(tmp_path / "notes.txt")


def test_legacy_format_checkpoint_reads_arch_without_mmap(tmp_path, model):
    from carp_fast.eval.cli import build_parser
    from carp_fast.eval.frozen import FrozenBackbone

    path = tmp_path / "legacy.pth"
    torch.save({"model": model.state_dict(), "config": {"arch": "resnet18_small"}}, path,
               _use_new_zipfile_serialization=False)  # fmt: skip
    args = build_parser().parse_args(["knn", "--checkpoint", str(path)])
    assert FrozenBackbone.from_args(args).arch == "resnet18_small"
