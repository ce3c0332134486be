"""CARP on ImageNet-1k, ResNet-50, 2x224 + 6x96 multi-crop: the paper's main setting.

    accelerate launch recipes/in1k_mc.py --data /path/to/imagenet --out runs/in1k_mc

4 GPUs x batch 64 x 16 accumulation steps = global batch 4096 (paper appendix C.1). With
another GPU count keep --global-batch: the accumulation follows. Every setting below, and
every CARPConfig setting (ResNet-50, K = 65,536, B = 512, LARS, weight decay 1e-6, teacher
momentum 0.99 -> 1, bf16, synchronised BatchNorm, channels_last by default), is an option; `--help`
lists them with their defaults. For 400 epochs the paper uses --base-lr 0.3 --final-lr 0.003.
"""

from carp_fast.carp import CARP
from carp_fast.options import REQUIRED
from carp_fast.run import pretrain

# ImageNet's data, crop sizes and monitoring, shared by the ImageNet recipes of every method.
IMAGENET = dict(
    data=REQUIRED,  # a folder with train/ and val/ in the ImageNet layout (class folders of JPEGs)
    global_size=224,
    local_size=96,
    workers=8,  # DALI threads per GPU
    knn_every=10,
    knn_bank=100_000,  # k-NN monitor: a labelled 100k bank keeps it to minutes
    knn_queries=10_000,
    log_every=50,
    checkpoint_minutes=20,  # a checkpoint inside the epoch too: a preempted job loses at most this
)

DEFAULTS = dict(
    **IMAGENET,
    out="runs/in1k_mc",
    epochs=200,
    # Optimisation (the model is CARPConfig's default: the paper's)
    base_lr=0.6,  # peak 0.6 x 4096 / 256 = 9.6, no warm-up (paper C.1; 0.3 for 400 epochs)
    final_lr=0.006,  # absolute end of the cosine, not scaled with the batch (0.003 for 400 epochs)
    batch_size=64,  # per GPU; lower it if memory runs out (the accumulation grows, the global batch stays)
    global_batch=4096,
    local_crops=6,  # and 2 global crops (CARPConfig.global_crops)
)


def main(argv=None, defaults=DEFAULTS) -> dict:
    """Train, evaluate and export; returns the summary (also in ``out/summary.json``)."""
    return pretrain(CARP, defaults, argv, __doc__)


if __name__ == "__main__":
    main()
