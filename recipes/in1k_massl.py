"""MaSSL on ImageNet-1k, ViT-S/16, 2x224 + 10x96 multi-crop: the published ViT-S run.

    accelerate launch recipes/in1k_massl.py --data /path/to/imagenet --out runs/in1k_massl

2 GPUs x batch 64 = global batch 128, 800 epochs (official README of sthalles/MaSSL). With
another GPU count keep --global-batch 128: the per-GPU batch or the accumulation follows.
The published ViT-B/16 run (4 GPUs x 32, 400 epochs) is this recipe with

    --arch vit_base --epochs 400 --base-lr 7.5e-4 --final-lr 2e-6
    --warmup-epochs 10 --teacher-momentum 0.996 --teacher-temperature-epochs 50

AdamW 5e-4 x 128 / 256, cosine to 1e-6, no warm-up; weight decay 0.04 -> 0.4; per-parameter
gradient clipping at 3; teacher momentum 0.992 -> 1; tau_s 0.1, tau_t 0.04 -> 0.07 over 30
epochs: MaSSLConfig's defaults. Every setting is an option; `--help` lists them.
"""

from carp_fast.massl import MASSL
from carp_fast.recipes.in1k_mc import IMAGENET
from carp_fast.run import pretrain

DEFAULTS = dict(
    **IMAGENET,  # data, 224 + 96 px crops, workers, k-NN monitoring: the CARP recipe's
    out="runs/in1k_massl",
    epochs=800,
    # Model
    arch="vit_small",  # timm ViT-S/16, class token; student drop-path 0.1, teacher 0
    memory_size=131_072,  # K as published (a multiple of the global micro-batch)
    block_size=16_384,  # 8 blocks per step, as published
    batch_size=64,  # per GPU
    global_batch=128,
    # Crops
    local_crops=10,
    global_scale=(0.32, 1.0),
    local_scale=(0.05, 0.32),
)


def main(argv=None, defaults=DEFAULTS) -> dict:
    """Train, evaluate and export; returns the summary (also in ``out/summary.json``)."""
    return pretrain(MASSL, defaults, argv, __doc__)


if __name__ == "__main__":
    main()
