"""Draw the crops of a few images of a batch (matplotlib)."""

from __future__ import annotations

import torch


def show_crops(batch: tuple[torch.Tensor, ...], mean, std, max_n: int = 4, size: float = 1.6):
    """One row per image, one column per crop; returns the matplotlib figure.

    Args:
        batch: `(*views, labels)`, each view float32 `[N, 3, S, S]` normalised with mean/std.
        max_n: at most this many images (rows).
    """
    import matplotlib.pyplot as plt

    *views, labels = batch
    n = min(max_n, len(labels))
    if n < 1:
        raise ValueError(f"max_n must be >= 1 and the batch non-empty, got max_n={max_n}, batch of {len(labels)}")
    mean_t = torch.tensor(mean).view(3, 1, 1)
    std_t = torch.tensor(std).view(3, 1, 1)
    fig, axes = plt.subplots(n, len(views), figsize=(size * len(views), size * n), squeeze=False)
    for r in range(n):
        for c, view in enumerate(views):
            image = (view[r].detach().float().cpu() * std_t + mean_t).clamp(0, 1)  # undo the normalisation
            ax = axes[r][c]
            ax.imshow(image.permute(1, 2, 0).numpy())
            ax.set_xticks([]), ax.set_yticks([])
            if r == 0:
                ax.set_title(f"view {c} ({view.shape[-1]} px)", fontsize=8)
        axes[r][0].set_ylabel(f"label {int(labels[r])}", fontsize=8)
    fig.tight_layout()
    return fig
