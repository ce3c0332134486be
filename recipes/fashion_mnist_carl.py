"""CARL on Fashion-MNIST in minutes: the embedded default's data, network and time budget.

    python recipes/fashion_mnist_carl.py             # at most 9 minutes, planned to this machine
    python recipes/fashion_mnist_carl.py --epochs 1 --train-images 2048 --minutes none   # a smoke test

CARL is CARP with no teacher network (the student's own assignments of the global crops,
detached, are the targets), one block of all K prototypes and an entropy weight lambda_e that
decays during training (carp_fast.carl). Ends by printing the k-NN top-1 (k = 20, T = 0.07)
and a linear probe's top-1 on the 10k test images (``--eval-on validation``: 10k held-out
training images) of the trained network (the student: there is no teacher) beside the
same network at random initialisation and the raw pixels.
"""

from carp_fast.carl import CARL
from carp_fast.recipes.fashion_mnist import DEFAULTS as CARP
from carp_fast.run import pretrain

DEFAULTS = {
    # CARP's data, network, crops, optimiser, time budget and monitoring (recipes/fashion_mnist.py)
    **{k: v for k, v in CARP.items() if k not in ("block_size", "teacher_momentum")},
    "out": "runs/fashion_mnist_carl",
    "n_prototypes": 1024,  # K, one block of all of them (CARLConfig's block_size None)
    # lambda_e: a cosine from 2 to 1 over the budget (CARLConfig's defaults; chosen on the
    # validation split against a constant 1: BENCHMARKS.md, FIDELITY.md)
}


def main(argv=None, defaults=DEFAULTS) -> dict:
    """Train, evaluate and export; returns the summary (also in ``out/summary.json``)."""
    return pretrain(CARL, defaults, argv, __doc__)


if __name__ == "__main__":
    main()
