"""SOP-MIM's inputs: block masks and a ViT's (masked) patch tokens; the loss is
:func:`carp_fast.sop.loss.mim_loss`.

Paper: Silva, Pedrini & Ramirez Rivera, ICML 2025, section 3 (official code: the patch branch
of ``main_ibot.py`` and ``PatchCrossEntropy`` in ``carp_loss.py`` of github sthalles/sop; its
block masking is iBOT's). The student sees its global crops with blocks of patches replaced by a
learnable mask token; the teacher sees them whole. Both patch-token sets are scored against SOPs
built from a second memory, of teacher patch embeddings (one task, each anchor alone: k = 1),
and the student's **masked** tokens are trained toward the teacher's tokens at the same places
of the same view.

Dimension letters: V_t global views, N images, L patches (h x w), C ViT width, T tasks,
S supports, P' SOPs.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch
import torch.nn as nn
from torch import Tensor



def block_masks(n: int, h: int, w: int, ratio: float = 0.3, *, min_patches: int = 4,
                aspect: tuple[float, float] = (0.3, 1 / 0.3), rng: random.Random | None = None) -> Tensor:
    """iBOT's block masking: rectangles of patches until about ``ratio`` of each image is masked.

    Each rectangle has an area drawn in ``[min_patches, patches still to mask]`` and a log-uniform
    aspect ratio in ``aspect``; a rectangle that adds nothing new is redrawn (10 tries), and
    an image stops when none fits. Drawn on the host with Python's ``random`` and numpy (a few
    milliseconds for 256 images of 14 x 14 patches; iBOT draws them in its loader's workers).

    Args:
        n, h, w: images and their patch grid.
        ratio: the fraction of patches to mask.
        rng: the random source (default: Python's global one).

    Returns:
        ``[n, h, w]`` bool, True where the student sees the mask token.
    """
    rng = rng or random
    masks = np.zeros((n, h, w), dtype=bool)
    target = round(ratio * h * w)
    log_lo, log_hi = math.log(aspect[0]), math.log(aspect[1])
    for mask in masks:
        while (left := target - int(mask.sum())) > 0:
            for _ in range(10):
                area = rng.uniform(min(min_patches, left), left)
                shape = math.exp(rng.uniform(log_lo, log_hi))
                bh, bw = round(math.sqrt(area * shape)), round(math.sqrt(area / shape))
                if not (1 <= bh <= h and 1 <= bw <= w):
                    continue
                top, lft = rng.randint(0, h - bh), rng.randint(0, w - bw)
                block = mask[top : top + bh, lft : lft + bw]
                new = int(block.size - block.sum())
                if 0 < new <= left:
                    block[...] = True
                    break
            else:
                break  # nothing fits: stop short of the target
    return torch.from_numpy(masks)


def vit_tokens(vit: nn.Module, images: Tensor, mask: Tensor | None = None, mask_token: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """A timm ViT's final-norm class token ``[N, C]`` and patch tokens ``[N, L, C]``.

    Where ``mask`` ``[N, h, w]`` is True the patch embedding is replaced by ``mask_token``
    ``[C]`` before the position embeddings (iBOT's masked embedding). Without a mask the class
    token equals ``vit(images)`` (timm's ``global_pool="token"``).
    """
    x = vit.patch_embed(images)  # [N, h, w, C] with dynamic_img_size, else [N, L, C]
    if mask is not None:
        x = torch.where(mask.reshape(*x.shape[:-1], 1), mask_token.to(x.dtype), x)
    x = vit.norm(vit.blocks(vit.norm_pre(vit.patch_drop(vit._pos_embed(x)))))  # [N, prefix + L, C]
    return x[:, 0], x[:, vit.num_prefix_tokens :]
