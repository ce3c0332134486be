"""CARL on ImageNet-1k, ResNet-50, 2x224 + 6x96 multi-crop: the CARP recipe without a teacher.

    accelerate launch recipes/in1k_carl.py --data /path/to/imagenet --out runs/in1k_carl

CARL (carp_fast.carl) is CARP with no teacher network, one block of all K = 65,536 prototypes
and a decaying entropy weight lambda_e (2 -> 1, a cosine; CARL's own K and schedule are not
known: FIDELITY.md). The data, crops, optimiser (LARS, 0.6 x 4096 / 256, cosine to 0.006) and
global batch are recipes/in1k_mc.py's; every setting is an option (`--help` lists them).
"""

from carp_fast.carl import CARL
from carp_fast.recipes.in1k_mc import DEFAULTS as CARP
from carp_fast.run import pretrain

DEFAULTS = {**CARP, "out": "runs/in1k_carl"}  # block_size: CARLConfig's None, one block of K


def main(argv=None, defaults=DEFAULTS) -> dict:
    """Train, evaluate and export; returns the summary (also in ``out/summary.json``)."""
    return pretrain(CARL, defaults, argv, __doc__)


if __name__ == "__main__":
    main()
