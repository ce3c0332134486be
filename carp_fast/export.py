"""Export a trained backbone for torchvision, timm and safetensors, with a round-trip check of each."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torchvision

from .backbones import build_backbone


def export_backbone(model: torch.nn.Module, path: str | os.PathLike, *, arch: str, which: str = "teacher") -> Path:
    """Save ``model.<which>.backbone`` for torchvision, timm and safetensors; returns ``path``.

    Two files, one state dict with torchvision's key names and no ``fc.*`` keys:

    - ``path`` (``torch.save``): ``torchvision.models.resnet50().load_state_dict(sd,
      strict=False)`` reports only the missing classifier, and timm's ``resnet50`` /
      ``resnet18`` (``timm.create_model(arch, num_classes=0)``) load it strictly;
    - ``path`` with the suffix ``.safetensors`` (``safetensors.torch.save_file``), the same
      tensors without pickle.

    Each file is reloaded into a fresh network (torchvision's, and timm's where timm has the
    architecture; the small-image ResNets are this project's) which must give the same
    features on a random batch, or a RuntimeError names the file.

    Args:
        model: a :class:`~carp_fast.networks.StudentTeacher` (optionally DDP-wrapped).
        path: the output file.
        arch: the backbone architecture the model was built with.
        which: ``"teacher"`` (the paper evaluates the teacher) or ``"student"``.
    """
    from safetensors.torch import save_file

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    backbone = getattr(getattr(model, "module", model), which).backbone
    state = {k.removeprefix("_orig_mod."): v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    path = Path(path)
    torch.save(state, path)
    save_file(state, path.with_suffix(".safetensors"))
    check_export(path, arch, reference=backbone)
    check_export(path.with_suffix(".safetensors"), arch, reference=backbone)
    if arch in TIMM_ARCHITECTURES:
        check_export(path, arch, reference=backbone, library="timm")
    return path


TIMM_ARCHITECTURES = ("resnet50", "resnet18")  # timm models with torchvision's key names


def check_export(path: str | os.PathLike, arch: str, reference: torch.nn.Module | None = None,
                 library: str = "torchvision") -> torch.nn.Module:
    """Load an exported backbone (``.pth`` or ``.safetensors``) into a fresh network of
    ``library`` (``"torchvision"``, or ``"timm"`` for :data:`TIMM_ARCHITECTURES`); compare
    its features with ``reference`` if given. Returns the fresh network (no classifier)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if library == "timm":
        import timm

        fresh = timm.create_model(arch, pretrained=False, num_classes=0)
    else:
        fresh = torchvision.models.resnet50() if arch == "resnet50" else build_backbone(arch)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise RuntimeError(f"{path}: exported keys do not fit {library}'s {arch}: missing {missing}, unexpected {unexpected}")
    if library != "timm":
        fresh.fc = torch.nn.Identity()
    if reference is not None:
        size = 64 if arch in TIMM_ARCHITECTURES else 28
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
            raise RuntimeError(f"{path}: the exported backbone loaded into {library} does not reproduce the trained one")
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
