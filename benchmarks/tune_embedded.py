"""Runs an embedded recipe once per setting and tabulates the k-NN and linear probe each reached.

    python benchmarks/tune_embedded.py --name lr5e-3 -- --base-lr 5e-3
    python benchmarks/tune_embedded.py --recipe fashion_mnist_massl --name massl-lr1e-3 -- --base-lr 1e-3
    python benchmarks/tune_embedded.py --name final --eval-on test      # the chosen setting, on the test set once
    python benchmarks/tune_embedded.py --table            # every run so far, as a Markdown table

Each run is ``recipes/RECIPE.py`` (``--recipe``: fashion_mnist, CARP, by default;
fashion_mnist_massl, fashion_mnist_carl, fashion_mnist_sop) in its own process with the extra
options given after ``--`` and its own ``--out`` under ``runs/tune/NAME``. It is scored on the
validation split by default (``--eval-on validation``: 10k training images held out of
pretraining and the bank, the same 10k for every recipe, setting and seed), so that settings
are chosen on it and the test set is measured once per chosen setting (``--eval-on test``). One
line per run (name, recipe, queries, options, k-NN and linear-probe top-1, optimizer steps,
images/s, wall time, machine) is appended to ``runs/tune/results.jsonl`` so that BENCHMARKS.md
can keep every setting tried, not only the winner. Run one at a time: two runs on 2 cores slow
each other and the time-planned schedules would shrink.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "runs" / "tune" / "results.jsonl"
RECIPES = ("fashion_mnist", "fashion_mnist_massl", "fashion_mnist_carl", "fashion_mnist_sop")


def cpu_name() -> str:
    """The CPU model and whether it has bf16 units (the two things that decide the speed here)."""
    import torch

    name = platform.processor() or "cpu"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    bf16 = torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    return f"{name}, {torch.get_num_threads()} threads, {'bf16 units' if bf16 else 'no bf16 units'}"


def run(name: str, options: list[str], recipe: str = "fashion_mnist", eval_on: str = "validation") -> dict:
    """One run of ``recipes/{recipe}.py`` scored on ``eval_on``; returns the row appended to the results file."""
    if any(o == "--eval-on" or o.startswith("--eval-on=") for o in options):
        raise SystemExit("tune_embedded.py: error: give --eval-on before --, not among the recipe's options")
    out = ROOT / "runs" / "tune" / name
    command = [sys.executable, str(ROOT / "recipes" / f"{recipe}.py"), "--out", str(out), "--no-progress",
               "--eval-on", eval_on, *options]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"run {name!r} failed with exit status {done.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [row["images_per_s"] for row in last if "images_per_s" in row]
    row = dict(name=name, recipe=recipe, eval_on=summary.get("eval_on", eval_on), options=" ".join(options),
               knn_top1=summary.get("knn_top1"), linear_top1=summary.get("linear_top1"), summary=summary,
               images_per_s=max(speeds) if speeds else None, wall_s=round(wall, 1), machine=cpu_name(),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f} %"


def table() -> str:
    """Every recorded run as a Markdown table (rows from before the validation split: the CARP
    recipe, scored on the test set)."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    lines = ["| run | recipe | queries | options | k-NN top-1 | linear probe top-1 | img/s | wall |",
             "|---|---|---|---|---:|---:|---:|---:|"]
    for r in rows:
        speed = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        wall = f"{r['wall_s']:.0f} s" if r.get("wall_s") else "-"
        lines.append(f"| {r['name']} | {r.get('recipe', 'fashion_mnist')} | {r.get('eval_on', 'test')} | `{r['options']}` "
                     f"| {_percent(r['knn_top1'])} | {_percent(r.get('linear_top1'))} | {speed} | {wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="run name (its folder under runs/tune/)")
    parser.add_argument("--recipe", choices=RECIPES, default="fashion_mnist", help="the embedded recipe to run (default: CARP's)")
    parser.add_argument("--eval-on", choices=("validation", "test"), default="validation",
                        help="the queries: validation (tuning: 10k held-out training images) or test (once per chosen setting)")
    parser.add_argument("--table", action="store_true", help="print every recorded run and exit")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="recipe options, after --")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    if not args.name:
        parser.error("--name is required to run")
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    row = run(args.name, options, args.recipe, args.eval_on)
    print(json.dumps({k: v for k, v in row.items() if k != "summary"}))


if __name__ == "__main__":
    main()
