"""Export a trained backbone (ResNet or ViT, of any method) for torchvision, timm and
safetensors, with a round-trip check of each."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch
import torchvision

from .backbones import VITS, build_backbone
from .distributed import unwrap


def export_backbone(model: torch.nn.Module, path: str | os.PathLike, *, arch: str, which: str = "teacher") -> Path:
    """Save ``model.<which>.backbone`` for torchvision, timm and safetensors; returns ``path``.

    Two files, one state dict with no classifier keys:

    - ``path`` (``torch.save``). A ResNet's keys are torchvision's:
      ``torchvision.models.resnet50().load_state_dict(sd, strict=False)`` reports only the
      missing classifier, and timm's ``resnet50`` / ``resnet18`` (``timm.create_model(arch,
      num_classes=0)``) load it strictly. A ViT's keys are timm's (``cls_token``,
      ``pos_embed``, ``patch_embed.proj.*``, ``blocks.<i>.*``, ``norm.*``), also the official
      MaSSL/DINO ViT's: ``timm.create_model("vit_small_patch16_224", num_classes=0)`` loads it
      strictly;
    - ``path`` with the suffix ``.safetensors`` (``safetensors.torch.save_file``), the same
      tensors without pickle.

    Each file is reloaded into a fresh network (torchvision's for ResNets, and timm's where
    timm has the architecture; the small-image ResNets are this project's) which must give
    the same features on a random batch, or a RuntimeError names the file.

    Args:
        model: a :class:`~carp_fast.networks.StudentTeacher` of any method (optionally DDP-wrapped).
        path: the output file.
        arch: the backbone architecture the model was built with.
        which: ``"teacher"`` (the paper evaluates the teacher) or ``"student"``.
    """
    from safetensors.torch import save_file

    if which not in ("teacher", "student"):
        raise ValueError(f"which must be 'teacher' or 'student', got {which!r}")
    backbone = getattr(unwrap(model), which).backbone
    state = {k.removeprefix("_orig_mod."): v.detach().cpu().contiguous().clone() for k, v in backbone.state_dict().items()}
    path = Path(path)
    torch.save(state, path)
    save_file(state, path.with_suffix(".safetensors"))
    check_export(path, arch, reference=backbone)
    check_export(path.with_suffix(".safetensors"), arch, reference=backbone)
    if arch in TIMM_RESNETS:
        check_export(path, arch, reference=backbone, library="timm")
    return path


TIMM_RESNETS = ("resnet50", "resnet18")  # timm models with torchvision's key names


def check_export(path: str | os.PathLike, arch: str, reference: torch.nn.Module | None = None,
                 library: str = "torchvision") -> torch.nn.Module:
    """Load an exported backbone (``.pth`` or ``.safetensors``) into a fresh network of
    ``library`` (``"torchvision"``, or ``"timm"`` for :data:`TIMM_RESNETS`; a ViT is always
    timm's); compare its features with ``reference`` if given. Returns the fresh network (no
    classifier)."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if arch in VITS:
        fresh = build_backbone(arch)  # timm's ViT
    elif library == "timm":
        import timm

        fresh = timm.create_model(arch, pretrained=False, num_classes=0)
    else:
        fresh = torchvision.models.resnet50() if arch == "resnet50" else build_backbone(arch)
    missing, unexpected = fresh.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("fc.") for k in missing):
        raise RuntimeError(f"{path}: exported keys do not fit {library}'s {arch}: missing {missing}, unexpected {unexpected}")
    if hasattr(fresh, "fc"):
        fresh.fc = torch.nn.Identity()
    if reference is not None:
        size = 64 if arch in TIMM_RESNETS else 32  # a ViT/16 takes multiples of 16
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
