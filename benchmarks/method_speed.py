"""Training speed of each method of the family on the embedded default, side by side in one run.

    python benchmarks/method_speed.py                         # every method, the recipes' settings
    python benchmarks/method_speed.py --methods carp carl --steps 5 --repeats 2

Each method runs its embedded recipe's settings (``recipes/fashion_mnist*.py``: network,
crops, batch, precision) through its real Learner with every callback it trains with, on one
synthetic batch already in memory (no input pipeline is timed). The measurements are rotated
``--repeats`` times (A B C, B C A, ...) so that the machine's drift hits them alike; the median
seconds per step is reported, with images/s and the ratio of CARP's step time to each method's
(above 1: faster than CARP). The last line printed is one JSON object.

``carp_no_teacher`` is CARP with ``teacher=False`` (table B.2's "w/o mom. enc."); CARL is that
with one block and its lambda_e schedule: both skip the teacher's forward pass.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):  # run as a script: make the repository's benchmarks/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_train import _device_name, learner_step, rotated, synthetic_crops  # noqa: E402


def recipes() -> dict:
    """``name -> (Method, recipe DEFAULTS, config overrides)`` of every embedded recipe."""
    from carp_fast.carl import CARL
    from carp_fast.carp import CARP
    from carp_fast.massl import MASSL
    from carp_fast.recipes import fashion_mnist, fashion_mnist_carl, fashion_mnist_massl

    found = {
        "carp": (CARP, fashion_mnist.DEFAULTS, {}),
        "carp_no_teacher": (CARP, fashion_mnist.DEFAULTS, {"teacher": False}),
        "carl": (CARL, fashion_mnist_carl.DEFAULTS, {}),
        "massl": (MASSL, fashion_mnist_massl.DEFAULTS, {}),
    }
    try:
        from carp_fast.recipes import fashion_mnist_sop
        from carp_fast.sop import SOP
    except ImportError:
        return found
    return found | {"sop": (SOP, fashion_mnist_sop.DEFAULTS, {})}


def method_setup(name: str, batch_size: int | None = None):
    """``(method, config, crops)`` of one method at its recipe's settings (``batch_size`` overrides)."""
    method, defaults, overrides = recipes()[name]
    fields = {f.name for f in dataclasses.fields(method.config)}
    settings = {k: v for k, v in defaults.items() if k in fields} | overrides
    if batch_size is not None:
        settings |= {"batch_size": batch_size, "global_batch": batch_size}
    settings["log_every"] = 10**6  # statistics: as between logging steps
    config = method.config(**settings)
    crops = synthetic_crops(config.batch_size, config.global_crops, defaults["global_size"], defaults.get("local_crops", 0),
                            defaults.get("local_size", defaults["global_size"]), torch.device("cpu"))
    return method, config, crops


def run(names: list[str], steps: int, warmup: int, repeats: int, batch_size: int | None = None, log=print) -> dict:
    steppers = {}
    for name in names:
        method, config, crops = method_setup(name, batch_size)
        torch.manual_seed(0)
        _, step = learner_step(config, crops, steps, warmup, method=method)
        steppers[name] = (step, config.batch_size)
    seconds = {name: [] for name in names}
    for r in range(repeats):
        for name in rotated(names, r):
            seconds[name].append(steppers[name][0]())
            log(f"repeat {r}: {name} {seconds[name][-1] * 1000:.1f} ms/step")
    result = {"device": _device_name(torch.device("cpu")), "threads": torch.get_num_threads(), "steps": steps,
              "repeats": repeats, "methods": {}}
    for name in names:
        median = statistics.median(seconds[name])
        result["methods"][name] = {"ms_per_step": round(median * 1000, 1),
                                   "images_per_s": round(steppers[name][1] / median, 1)}
        if "carp" in seconds:  # paired per repeat: CARP's time over this method's
            ratio = statistics.median(c / s for c, s in zip(seconds["carp"], seconds[name]))
            result["methods"][name]["carp_time_over_this"] = round(ratio, 3)
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=None, help="default: every embedded recipe's method")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps first, in every measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=None, help="default: each recipe's")
    args = parser.parse_args(argv)
    names = args.methods or list(recipes())
    unknown = sorted(set(names) - set(recipes()))
    if unknown:
        parser.error(f"--methods: unknown {unknown}; choose from {sorted(recipes())}")
    result = run(names, args.steps, args.warmup, args.repeats, args.batch_size)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
