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
