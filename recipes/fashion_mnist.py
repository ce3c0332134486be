"""The embedded default: CARP on Fashion-MNIST in minutes, on whatever device there is.

    python recipes/fashion_mnist.py                       # a 9-minute run, planned to this machine
    python recipes/fashion_mnist.py --minutes 3           # a shorter one (its schedules complete too)
    python recipes/fashion_mnist.py --epochs 1 --train-images 2048 --minutes none   # a smoke test
    python recipes/fashion_mnist.py --eval-on validation  # scored on 10k held-out training images: for tuning

The run is planned to its budget: the first optimizer steps are timed, and the learning-rate
and momentum schedules are sized to the steps this machine does in ``--minutes`` (start-up and
the final evaluation included), printed as ``plan: N steps of batch B ...``. It ends by printing
the k-NN top-1 (k = 20, T = 0.07) and a linear probe's top-1 on the 10k test images (shrunk to
18 px, the scale the crops show) of the trained teacher beside those of the same network at
random initialisation and of the raw pixels. ``--eval-on validation`` scores on 10k training
images held out of pretraining and the bank instead (the same 10k for every method and seed):
choose settings there, measure the test once. Every setting below is an option (``--help``
lists them with their defaults).
"""

from carp_fast.carp import CARP
from carp_fast.run import pretrain

DEFAULTS = dict(
    data="fashion-mnist",  # Debian's dataset-fashion-mnist, /usr/share/datasets/fashion-mnist
    out="runs/fashion_mnist",
    # Model
    arch="resnet10_tiny",  # 1.2M parameters: a CPU trains it in minutes
    n_prototypes=1024,  # small K for 60k images
    block_size=64,  # 16 blocks: small blocks are stable at small batches (paper B.2)
    hidden_dim=512,
    embed_dim=128,
    # Optimisation, tuned in the budget (BENCHMARKS.md, "Tuning the embedded default": what
    # each choice was measured against)
    optimizer="adamw",  # LARS needs long schedules; AdamW learns far more in minutes
    base_lr=5e-3,  # x 128 / 256
    final_lr=2e-5,  # the cosine's absolute end
    weight_decay=0.05,
    batch_size=128,  # more steps per image than 256
    global_batch=128,
    teacher_momentum=0.97,  # few steps: a faster teacher
    # Crops of the 28 px images, smaller than the images: less compute a step, more steps in the
    # budget (the sizes tried: BENCHMARKS.md, same section)
    global_size=16,
    local_size=10,
    local_crops=2,
    global_scale=(0.3, 1.0),
    local_scale=(0.1, 0.3),
    blur_sigma=(0.1, 0.5),  # 2 px of blur would erase a 28 px image
    # Budget: the schedules are sized to what this machine does in `minutes`
    minutes=9,  # the whole run, start-up and evaluation included
    epochs=50,  # the most: a fast machine stops here
    train_images=0,  # all 60k
    workers=2,
    # Monitoring
    # The whole 28 px image shrunk to 18 px: a 16 px crop of 30-100 % of the image shows it at
    # 0.57-1.04 of its size, so the evaluation shows it at such a scale too (the train-test
    # resolution discrepancy of FixRes, Touvron et al. 2019; measured in docs/embedded-default.md)
    eval_size=18,
    eval_resize=18,
    knn_bank=20_000,  # labelled training images in the k-NN bank (test: all 10k)
    knn_every=0,  # only after the last epoch
    knn_random_init=True,  # and at initialisation, beside the raw pixels
    linear_probe=True,  # a second protocol on the same cached features: a linear probe, seconds on a CPU
    eval_on="test",  # the README's numbers; 'validation' holds 10k training images out as queries (for tuning)
    log_every=10,
)


def main(argv=None, defaults=DEFAULTS) -> dict:
    """Train, evaluate and export; returns the summary (also in ``out/summary.json``)."""
    return pretrain(CARP, defaults, argv, __doc__)


if __name__ == "__main__":
    main()
