"""Export a trained backbone as a plain torchvision state dict, with a round-trip check."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torchvision

from .backbones import build_backbone


def export_backbone(model: torch.nn.Module, path: str | os.PathLike, *, arch: str, which: str = "teacher") -> Path:
    """Save ``model.<which>.backbone`` so torchvision (or the small variant) loads it.

    The file holds a plain state dict with torchvision's key names and no ``fc.*`` keys:
    ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` reports only the
    missing classifier. The export is reloaded into a fresh network and must give the same
    features on a random batch, or a RuntimeError is raised.

    Args:
        model: a :class:`~carp_fast.networks.StudentTeacher` (optionally DDP-wrapped).
        path: the output file.
        arch: the backbone architecture the model was built with.
        which: ``"teacher"`` (the paper evaluates the teacher) or ``"student"``.
    """
    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    backbone = getattr(getattr(model, "module", model), which).backbone
    state = {k.removeprefix("_orig_mod."): v.detach().cpu().clone() for k, v in backbone.state_dict().items()}
    path = Path(path)
    torch.save(state, path)
    check_export(path, arch, reference=backbone)
    return path


def check_export(path: str | os.PathLike, arch: str, reference: torch.nn.Module | None = None) -> torch.nn.Module:
    """Load an exported backbone into a fresh network; compare with ``reference`` if given."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    fresh = torchvision.models.resnet50() if arch == "resnet50" else build_backbone(arch)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise RuntimeError(f"{path}: exported keys do not fit {arch}: missing {missing}, unexpected {unexpected}")
    fresh.fc = torch.nn.Identity()
    if reference is not None:
        size = 64 if arch == "resnet50" else 28
        x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
        device = next(reference.parameters()).device
        # Both networks on the trained one's device, in full fp32: CUDA's default TF32
        # convolutions differ by ~1e-3, which says nothing about the export. fp32 cuDNN
        # algorithms still differ a little between the two copies, hence CUDA's tolerance.
        rtol, atol = (1e-4, 1e-5) if device.type == "cpu" else (1e-3, 1e-4)
        was_training = reference.training
        reference.eval(), fresh.to(device).eval()
        with torch.no_grad(), _ieee_fp32():
            same = torch.allclose(fresh(x.to(device)), reference(x.to(device)).float(), rtol=rtol, atol=atol)
        reference.train(was_training)
        fresh.cpu()
        if not same:
            raise RuntimeError(f"{path}: the exported backbone does not reproduce the trained one")
    return fresh


@contextlib.contextmanager
def _ieee_fp32():
    """fp32 convolutions and matmuls without TF32 inside the block (torch's fp32_precision API)."""
    settings = (torch.backends.cudnn.conv, torch.backends.cuda.matmul)
    before = [s.fp32_precision for s in settings]
    for s in settings:
        s.fp32_precision = "ieee"
    try:
        yield
    finally:
        for s, value in zip(settings, before):
            s.fp32_precision = value
