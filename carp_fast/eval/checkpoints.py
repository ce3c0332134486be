"""Load a frozen backbone from a checkpoint, whichever code wrote it.

Three layouts are recognised (the usual source of "key mismatch" reports when loading
self-supervised weights into torchvision):

1. this project's checkpoints: ``{"model": StudentTeacher.state_dict(), "settings": {...}, ...}``
   (``learn.save`` adds ``"opt"``), keys ``student.backbone.*`` / ``teacher.backbone.*``;
2. the paper's official code (the released checkpoints): ``{"student": sd, "teacher": sd,
   "optimizer", "epoch", "args", "fp16_scaler"}`` where each state dict comes from a
   DistributedDataParallel-wrapped network, keys ``module.backbone.*`` and
   ``module.head.mlp.*`` / ``module.head.last_layer.weight_g`` / ``weight_v``, and
   ``args`` is the run's ``argparse.Namespace`` (which the safe loader accepts);
3. a plain torchvision ResNet or timm ViT state dict (an exported backbone), ``fc.*`` ignored;
4. MaSSL checkpoints, this project's (``settings["arch"]`` a ViT or a ResNet) and the
   official code's (``{"student", "teacher", "optimizer", "memory_bank", "epoch", "args",
   "fp16_scaler"}``, the teacher's keys ``backbone.*`` unwrapped, the student's
   ``module.backbone.*``; ``args.arch`` names the ViT). ViT features are the class token
   after the final norm (timm's ``global_pool="token"``, the official ``norm(x)[:, 0]``).

``_orig_mod.`` (torch.compile) and leading ``module.`` (DDP) prefixes are removed first.
The backbone is then loaded strictly: a missing or unexpected backbone key is an error.
"""

from __future__ import annotations

import argparse
import os
import pickle
from typing import Any, Mapping

import torch
import torch.nn as nn

from carp_fast.backbones import ARCHITECTURES, VITS, build_backbone

WHICH = ("teacher", "student")


def read_checkpoint(path: str | os.PathLike, *, weights_only: bool = True, mmap: bool = False) -> Any:
    """``torch.load`` on the CPU, with torch's safe (weights-only) unpickler by default.

    The safe loader is widened by exactly two kinds of objects: numpy arrays and dtypes
    (this project's training checkpoints hold numpy's RNG state) and ``argparse.Namespace``
    (the run's arguments that the official CARP checkpoints pickle as ``"args"``; a
    Namespace only holds attributes, it runs no code when unpickled). A file that pickles
    anything else is refused with a ValueError; pass ``weights_only=False`` only for a
    file you trust.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: a file that is not a torch checkpoint (a text file, a truncated
            download) or one the safe loader refuses; the message names the file.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {os.fspath(path)!r}")
    if os.path.isdir(path):
        raise ValueError(f"checkpoint {os.fspath(path)!r} is a directory; give the checkpoint file")
    try:
        return _load(path, weights_only, mmap)
    except RuntimeError:
        if not mmap:
            raise ValueError(_not_a_checkpoint(path)) from None
    # mmap needs the zip format of torch >= 1.6: retry a legacy file without it.
    try:
        return _load(path, weights_only, False)
    except RuntimeError:
        raise ValueError(_not_a_checkpoint(path)) from None


def _load(path: str | os.PathLike, weights_only: bool, mmap: bool) -> Any:
    """``torch.load`` with the widened safe loader; RuntimeError for an unreadable file."""
    try:
        if not weights_only:
            return torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
        with torch.serialization.safe_globals(_safe_globals()):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as error:
        if "GLOBAL" not in str(error):
            raise RuntimeError(str(error)) from None  # garbage ("Unsupported operand"), not a refused object
        lines = str(error).strip().splitlines()
        first_line = next((ln for ln in lines if "GLOBAL" in ln), lines[-1])
        first_line = first_line.strip()[:200]
        raise ValueError(
            f"{os.fspath(path)!r} pickles objects other than tensors, so the safe loader "
            f"refuses it ({first_line}); if you trust the file, load it with "
            "weights_only=False (command line: --trust-checkpoint)"
        ) from None
    except (KeyError, EOFError, OSError, UnicodeDecodeError, IndexError, TypeError, AttributeError) as error:
        # e.g. a text file read as a legacy pickle ends in `KeyError: 101`.
        raise RuntimeError(f"{type(error).__name__}: {error}") from None


def _safe_globals() -> list:
    """What the safe loader may unpickle beside tensors: numpy arrays/dtypes, Namespace."""
    import numpy as np

    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray  # numpy 2 / 1
    allowed = [np.ndarray, np.dtype, multiarray._reconstruct, argparse.Namespace]
    allowed += [type(np.dtype(t)) for t in (np.uint32, np.int64, np.float32, np.float64)]
    return allowed


def _not_a_checkpoint(path: str | os.PathLike) -> str:
    size = os.path.getsize(path)
    return (
        f"{os.fspath(path)!r} is not a readable torch checkpoint ({size} bytes): not a file "
        "written by torch.save, or a truncated download; check the path, or download it again"
    )


def checkpoint_arch(checkpoint: Any) -> str | None:
    """The ``arch`` a checkpoint names: this project's ``settings`` (or ``config``), or the
    official code's pickled ``args`` (``resnet50`` for CARP, ``vit_small`` / ``vit_base``
    for MaSSL). None when it names none (a plain state dict)."""
    if isinstance(checkpoint, Mapping):
        for key in ("config", "settings"):
            config = checkpoint.get(key)
            if isinstance(config, Mapping) and isinstance(config.get("arch"), str):
                return config["arch"]
        args = checkpoint.get("args")
        if isinstance(args, argparse.Namespace) and isinstance(getattr(args, "arch", None), str):
            if args.arch in VITS and getattr(args, "patch_size", 16) != 16:
                raise ValueError(f"the checkpoint's ViT has patch size {args.patch_size}; carp_fast evaluates ViT/16 only")
            return args.arch
    return None


def has_teacher(checkpoint: Any) -> bool:
    """False for this project's checkpoints of a run without a teacher network (its
    ``settings`` or ``config`` say ``teacher: False``); True otherwise."""
    if isinstance(checkpoint, Mapping):
        for key in ("config", "settings"):
            config = checkpoint.get(key)
            if isinstance(config, Mapping) and config.get("teacher") is False:
                return False
    return True


def backbone_state_dict(checkpoint: Any, which: str = "teacher") -> dict[str, torch.Tensor]:
    """Extract the backbone's state dict (torchvision key names, no ``fc.*``).

    Args:
        checkpoint: a loaded checkpoint in any layout of the module docstring.
        which: ``"teacher"`` (the momentum encoder, the paper's evaluation default,
            appendix B.4) or ``"student"``. Ignored for a plain torchvision state dict.

    Returns:
        ``{torchvision_key: tensor}`` ready for ``build_backbone(arch).load_state_dict``.

    A checkpoint of a run without a teacher network (this project's ``settings["teacher"]``
    False: CARL, or CARP with ``--no-teacher``) holds only the student, which is then the
    network evaluated for ``which="teacher"`` too (an EMA with eta = 0 is the student).

    Raises:
        ValueError: unknown ``which``; no backbone found; a checkpoint holding the
            other network only.
    """
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if which == "teacher" and not has_teacher(checkpoint):
        which = "student"
    state = checkpoint
    if isinstance(state, Mapping) and which in state and isinstance(state[which], Mapping):
        state = state[which]  # official layout: {"student": sd, "teacher": sd}
    elif isinstance(state, Mapping) and isinstance(state.get("model"), Mapping):
        state = state["model"]  # this project / fastai learn.save
    elif isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]  # common export convention
    if not isinstance(state, Mapping):
        raise ValueError(f"checkpoint must be a dict of tensors, got {type(state).__name__}")
    state = {_strip_wrappers(k): v for k, v in state.items() if isinstance(v, torch.Tensor)}

    for prefix in (f"{which}.backbone.", "backbone."):
        backbone = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if backbone:
            break
    else:
        other = WHICH[1 - WHICH.index(which)]
        if any(k.startswith(f"{other}.backbone.") for k in state):
            raise ValueError(
                f"checkpoint holds a {other} backbone but no {which} backbone; "
                f"pass which={other!r}"
            )
        if "conv1.weight" not in state and "cls_token" not in state:
            sample = sorted(state)[:5]
            raise ValueError(
                "checkpoint has no backbone: expected keys '<student|teacher>.backbone.*', "
                f"'backbone.*', torchvision ResNet keys ('conv1.weight', ...) or timm ViT keys "
                f"('cls_token', ...), got {sample}"
            )
        backbone = state  # plain torchvision / timm state dict
    if "fc_norm.weight" in backbone:
        raise ValueError("the checkpoint's ViT pools by the mean of its patch tokens (fc_norm); carp_fast evaluates the class token")
    # masked_embed: the official MaSSL's masked-image-modelling token, not part of the features.
    return {k: v for k, v in backbone.items() if not k.startswith(("fc.", "masked_embed"))}


def infer_arch(checkpoint: Any, which: str = "teacher") -> str:
    """The architecture a checkpoint was trained with: the one it names, else a ViT's by its
    width, else ``"resnet50"`` (the official CARP code and torchvision exports)."""
    stored = checkpoint_arch(checkpoint)
    if stored is not None:
        return stored
    try:
        return _vit_arch(backbone_state_dict(checkpoint, which)) or "resnet50"
    except ValueError:
        return "resnet50"


def _vit_arch(state: Mapping[str, torch.Tensor]) -> str | None:
    """vit_small or vit_base from a ViT state dict's width (384 / 768); None for a ResNet."""
    width = state["cls_token"].shape[-1] if "cls_token" in state else None
    return {384: "vit_small", 768: "vit_base"}.get(width)


def load_backbone(
    path: str | os.PathLike | Mapping,
    arch: str | None = None,
    which: str = "teacher",
    *,
    weights_only: bool = True,
) -> nn.Module:
    """A backbone (``fc = Identity``) with weights from a checkpoint, in eval mode.

    Args:
        path: a checkpoint file, or an already loaded checkpoint dict.
        arch: one of :data:`ARCHITECTURES` (the ResNets and MaSSL's ViTs); None reads it from
            the checkpoint (this project's settings, the official ``args``, a ViT's width)
            and falls back to ``"resnet50"`` (torchvision exports).
        which: ``"teacher"`` or ``"student"``.

    Returns:
        the backbone mapping ``[N, 3, H, W]`` to ``[N, D]`` features.

    Raises:
        ValueError: as :func:`backbone_state_dict`; an ``arch`` that contradicts the
            checkpoint's config; missing or unexpected backbone keys, or shape mismatches.
    """
    checkpoint = path if isinstance(path, Mapping) else read_checkpoint(path, weights_only=weights_only)
    state = backbone_state_dict(checkpoint, which)
    stored = checkpoint_arch(checkpoint) or _vit_arch(state)
    if arch is None:
        arch = stored or "resnet50"
    elif stored is not None and stored != arch:
        raise ValueError(f"arch={arch!r} but the checkpoint was trained with arch={stored!r}")
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    backbone = build_backbone(arch)
    try:
        result = backbone.load_state_dict(state, strict=False)
    except RuntimeError as error:  # shape mismatches: usually the wrong arch
        mismatches = [ln.strip() for ln in str(error).splitlines() if "size mismatch" in ln]
        raise ValueError(
            f"backbone weights do not fit arch={arch!r} ({len(mismatches)} shape mismatches, "
            f"e.g. {mismatches[:2]}); pass the arch the weights were trained with, one of "
            f"{ARCHITECTURES}"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"backbone keys do not match arch={arch!r}: missing {result.missing_keys[:10]} "
            f"({len(result.missing_keys)} in all), unexpected {result.unexpected_keys[:10]} "
            f"({len(result.unexpected_keys)} in all)"
        )
    return backbone.eval()


def _strip_wrappers(key: str) -> str:
    """Remove torch.compile's ``_orig_mod.`` (anywhere) and DDP's leading ``module.``."""
    key = key.replace("_orig_mod.", "")
    while key.startswith("module."):
        key = key[len("module.") :]
    return key
