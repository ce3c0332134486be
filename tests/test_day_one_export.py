"""The export round-trip check on a device whose convolutions carry TF32-sized errors (issue 12)."""

import pytest
import torch

from carp_fast.backbones import build_backbone
from carp_fast.export import check_export


class TF32Backbone(torch.nn.Module):
    """A backbone as CUDA runs it by default: while cuDNN may use TF32 for fp32 convolutions
    (``torch.backends.cudnn.conv.fp32_precision`` not "ieee"), its features carry relative
    errors of about 1e-3 (TF32 keeps 10 mantissa bits)."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        y = self.backbone(x)
        if torch.backends.cudnn.conv.fp32_precision != "ieee":
            y = y * (1 + 1e-3 * torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        return y


@pytest.fixture
def exported(tmp_path):
    torch.manual_seed(0)
    backbone = build_backbone("resnet10_tiny")
    torch.save(backbone.state_dict(), tmp_path / "b.pth")
    return tmp_path / "b.pth", backbone


def test_export_check_ignores_tf32_errors(exported):
    path, backbone = exported
    check_export(path, "resnet10_tiny", reference=TF32Backbone(backbone))  # does not raise
    assert torch.backends.cudnn.conv.fp32_precision == "tf32"  # the user's setting is back


def test_export_check_still_catches_other_weights(exported):
    path, _ = exported
    torch.manual_seed(1)
    other = build_backbone("resnet10_tiny")
    with pytest.raises(RuntimeError, match="does not reproduce"):
        check_export(path, "resnet10_tiny", reference=TF32Backbone(other))


def test_one_call_exports_for_torchvision_timm_and_safetensors(tmp_path):
    """A ResNet-50 teacher exported once loads into torchvision, timm and safetensors, each
    giving the teacher's own features (computed here from the live module)."""
    import timm
    import torchvision
    from safetensors.torch import load_file

    from carp_fast.export import export_backbone
    from carp_fast.carp import CARPStudentTeacher

    torch.manual_seed(0)
    model = CARPStudentTeacher("resnet50", n_prototypes=32, block_size=8, hidden_dim=16, embed_dim=8)
    for p in model.teacher.backbone.parameters():  # not the initial weights: zero_init_residual hides key mix-ups
        p.data.normal_(0, 0.05)
    path = export_backbone(model, tmp_path / "backbone_teacher.pth", arch="resnet50")
    x = torch.randn(2, 3, 64, 64)
    model.teacher.backbone.eval()
    with torch.no_grad():
        expected = model.teacher.backbone(x)
        tv = torchvision.models.resnet50()
        tv.load_state_dict(torch.load(path, weights_only=True), strict=False)
        tv.fc = torch.nn.Identity()
        tm = timm.create_model("resnet50", pretrained=False, num_classes=0)
        tm.load_state_dict(load_file(str(tmp_path / "backbone_teacher.safetensors")))  # strict
        torch.testing.assert_close(tv.eval()(x), expected, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(tm.eval()(x), expected, rtol=1e-4, atol=1e-5)
