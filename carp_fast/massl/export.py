"""Export a MaSSL backbone: timm's ViT state dict (or torchvision's ResNet), round-trip checked."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..backbones import ARCHITECTURES as RESNETS
from ..export import _ieee_fp32, export_backbone
from .networks import build_backbone


def export_massl_backbone(model: torch.nn.Module, path: str | os.PathLike, *, arch: str, which: str = "teacher") -> Path:
    """Save ``model.<which>.backbone`` as a plain state dict; returns the path.

    A ViT's keys are timm's (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``,
    ``blocks.<i>.*``, ``norm.*``), which are also the official MaSSL/DINO ViT's:
    ``timm.create_model("vit_small_patch16_224", num_classes=0).load_state_dict(sd)`` loads it
    strictly. ResNets go through :func:`carp_fast.export.export_backbone`. The file is
    reloaded into a fresh network, which must give the same features on a random batch.

    Args:
        model: a :class:`~carp_fast.massl.networks.MaSSLStudentTeacher` (optionally DDP-wrapped).
        path: the output file.
        arch: the architecture the model was built with.
        which: ``"teacher"`` (evaluated by the paper) or ``"student"``.
    """
    if arch in RESNETS:
        return export_backbone(model, path, arch=arch, which=which)
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    backbone = getattr(getattr(model, "module", model), which).backbone
    state = {k.removeprefix("_orig_mod."): v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    path = Path(path)
    torch.save(state, path)

    fresh = build_backbone(arch)
    fresh.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))  # strict: same keys
    device = next(backbone.parameters()).device
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
    rtol, atol = (1e-4, 1e-5) if device.type == "cpu" else (1e-3, 1e-4)  # as carp_fast.export: cuDNN/cuBLAS algorithms differ
    was_training = backbone.training
    backbone.eval(), fresh.to(device).eval()
    with torch.no_grad(), _ieee_fp32():  # no TF32: its ~1e-3 errors say nothing about the export
        same = torch.allclose(fresh(x), backbone(x).float(), rtol=rtol, atol=atol)
    backbone.train(was_training)
    if not same:
        raise RuntimeError(f"{path}: the exported backbone does not reproduce the trained one")
    return path
