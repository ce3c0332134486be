"""SOP on ImageNet-1k, ViT-S/16, 2 x 224 px global crops: the official settings, [CLS] and SOP-MIM.

    accelerate launch recipes/in1k_sop.py --data /path/to/imagenet --out runs/in1k_sop

The official code's defaults (github sthalles/sop, ``main_ibot.py``; DESIGN section 11): a
[CLS] memory of 65,536 teacher embeddings; per step 4 tasks of 64 anchors, 32 kept, each with
8 nearest neighbours; votes smoothed by 0.1; tau_s 0.1, tau_t 0.04; AdamW 5e-4 x batch / 256
with 10 warm-up epochs and a cosine to 1e-6; weight decay 0.04 -> 0.4; per-parameter gradient
clipping at 3; teacher momentum 0.996 -> 1; student drop-path 0.1; 2 global crops of scale
0.14-1 and no local crops; 100 epochs; bf16. 128 images per GPU as published; the published
GPU count is not given, so the global batch is 1,024 (8 GPUs, iBOT's ViT-S batch): with
another count keep --global-batch 1024 (the accumulation follows) or set it. SOP-MIM: a patch
memory of 8,192 teacher patch embeddings, one task of 512 anchors each alone (k = 1), 30 % of
the student's global-crop patches block-masked (--no-mim: the [CLS] loss alone). Every setting
is an option; `--help` lists them.
"""

from carp_fast.recipes.in1k_mc import IMAGENET
from carp_fast.run import pretrain
from carp_fast.sop import SOP

DEFAULTS = dict(
    **IMAGENET,  # data, 224 px crops, workers, k-NN monitoring: the CARP recipe's
    out="runs/in1k_sop",
    epochs=100,
    # Model: SOPConfig's defaults are the official ones (ViT-S/16, K = 65,536, T = 4, P = 64, P' = 32, k = 9;
    # SOP-MIM with 8,192 patch slots, 512 patch anchors, mask ratio 0.3)
    arch="vit_small",
    batch_size=128,  # per GPU, as published
    global_batch=1024,  # 8 x 128; a multiple of the memory's writes (65,536 / 1,024 = 64 steps per turn)
    # Crops: two global crops only (official default)
    local_crops=0,
    global_scale=(0.14, 1.0),
)


def main(argv=None, defaults=DEFAULTS) -> dict:
    """Train, evaluate and export; returns the summary (also in ``out/summary.json``)."""
    return pretrain(SOP, defaults, argv, __doc__)


if __name__ == "__main__":
    main()
