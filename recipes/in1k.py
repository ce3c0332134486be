"""CARP on ImageNet-1k, ResNet-50, two 224 px views (no multi-crop).

    accelerate launch recipes/in1k.py --data /path/to/imagenet --out runs/in1k

The multi-crop recipe without local crops; everything else is shared with it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from in1k_mc import SETTINGS as MULTI_CROP  # noqa: E402

SETTINGS = {**MULTI_CROP, "out": "runs/in1k", "local_crops": 0}

if __name__ == "__main__":
    from carp_fast.train import run

    run(SETTINGS, description=__doc__)
