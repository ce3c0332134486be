"""The family side by side: each method's embedded recipe at equal minutes, over seeds, one table.

    python benchmarks/compare_methods.py --minutes 5 --seeds 0 1 2 --eval-on test
    python benchmarks/compare_methods.py --methods carp massl --seeds 0 --eval-on validation
    python benchmarks/compare_methods.py --table --prefix compare-test   # the table of runs already made

Each run is ``recipes/fashion_mnist*.py`` (CARP, CARL, MaSSL, SOP: the same data, network,
crops, batch and evaluation; each method's own settings, chosen on the validation split) with
``--minutes M --seed S``, made by :func:`benchmarks.tune_embedded.run` (its own process, its
line in ``runs/tune/results.jsonl``, named ``PREFIX-METHOD-sSEED``). The table gives, per method,
the mean and standard deviation over the seeds of the k-NN top-1 (k = 20, T = 0.07) and of the
linear probe's top-1 of the trained network, the optimizer steps it made in the minutes, and the
raw pixels and the random initialisation on the same bank and queries. Runs go one at a time:
two on 2 cores slow each other and the time-planned schedules would shrink.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository's benchmarks/ importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.tune_embedded import RESULTS, run  # noqa: E402

METHODS = {"carp": "fashion_mnist", "carl": "fashion_mnist_carl", "massl": "fashion_mnist_massl", "sop": "fashion_mnist_sop"}


def run_name(prefix: str, method: str, seed: int) -> str:
    return f"{prefix}-{method}-s{seed}"


def recorded(prefix: str) -> dict[str, list[dict]]:
    """``method -> rows`` of the runs named ``PREFIX-METHOD-sSEED`` in the results file (the last
    row of each name, so a re-run replaces its earlier one)."""
    rows = {}
    if RESULTS.exists():
        for line in RESULTS.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                rows[row["name"]] = row
    found: dict[str, list[dict]] = {}
    for method in METHODS:
        head = f"{prefix}-{method}-s"
        found[method] = [r for name, r in rows.items() if name.startswith(head) and name[len(head):].isdigit()]
    return {m: r for m, r in found.items() if r}


def _mean_std(values: list[float]) -> str:
    if not values:
        return "-"
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.fmean(values):.2f} ± {spread:.2f}"


def table(prefix: str) -> str:
    """The Markdown table of the recorded runs of ``prefix`` (mean ± std over seeds)."""
    lines = ["| method | seeds | queries | k-NN top-1 % | linear probe top-1 % | steps | raw pixels (k-NN / probe) | random init (k-NN / probe) |",
             "|---|---:|---|---:|---:|---:|---:|---:|"]
    for method, rows in recorded(prefix).items():
        summaries = [r["summary"] for r in rows]
        knn = [s["knn_top1"] for s in summaries]
        probe = [s["linear_top1"] for s in summaries if s.get("linear_top1") is not None]
        steps = [s.get("steps_run") for s in summaries if s.get("steps_run")]
        first = summaries[0]
        pixels = f"{first.get('knn_top1_raw_pixels', float('nan')):.2f} / {first.get('linear_top1_raw_pixels', float('nan')):.2f}"
        init = _mean_std([s["knn_top1_random_init"] for s in summaries if "knn_top1_random_init" in s])
        init_probe = _mean_std([s["linear_top1_random_init"] for s in summaries if "linear_top1_random_init" in s])
        lines.append(f"| {method} | {len(rows)} | {rows[0].get('eval_on', '?')} | {_mean_std(knn)} | {_mean_std(probe)} | "
                     f"{min(steps) if steps else '-'}-{max(steps) if steps else '-'} | {pixels} | {init} / {init_probe} |")
    return "\n".join(lines)


def main(argv=None) -> str:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--minutes", type=float, default=5.0, help="each run's whole budget (the recipes plan to it)")
    parser.add_argument("--eval-on", choices=("validation", "test"), default="validation",
                        help="validation while choosing; test once, for the chosen settings")
    parser.add_argument("--prefix", default=None, help="run names' prefix (default: compare-EVAL_ON-mMINUTES)")
    parser.add_argument("--table", action="store_true", help="print the table of the runs already recorded and exit")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="options for every recipe, after --")
    args = parser.parse_args(argv)
    if args.minutes <= 0:
        parser.error(f"--minutes must be > 0, got {args.minutes}")
    prefix = args.prefix or f"compare-{args.eval_on}-m{args.minutes:g}"
    if not args.table:
        extra = args.options[1:] if args.options[:1] == ["--"] else args.options
        for seed in args.seeds:
            for method in args.methods:
                row = run(run_name(prefix, method, seed), ["--minutes", str(args.minutes), "--seed", str(seed), *extra],
                          METHODS[method], args.eval_on)
                print(f"{row['name']}: k-NN {row['knn_top1']} %, probe {row['linear_top1']} %", flush=True)
    text = table(prefix)
    print(text)
    return text


if __name__ == "__main__":
    main()
