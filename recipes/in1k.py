"""CARP on ImageNet-1k, ResNet-50, two 224 px views (no multi-crop).

    accelerate launch recipes/in1k.py --data /path/to/imagenet --out runs/in1k

The multi-crop recipe (recipes/in1k_mc.py) without local crops; everything else, and the
steps of the run, are that recipe's.
"""

from carp_fast.recipes.in1k_mc import DEFAULTS as MULTI_CROP
from carp_fast.recipes.in1k_mc import main as run_in1k

DEFAULTS = {**MULTI_CROP, "out": "runs/in1k", "local_crops": 0}


def main(argv=None) -> dict:
    return run_in1k(argv, defaults=DEFAULTS)


if __name__ == "__main__":
    main()
