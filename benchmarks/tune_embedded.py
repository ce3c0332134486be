"""Runs the embedded recipe once per setting and tabulates the k-NN each reached.

    python benchmarks/tune_embedded.py --name lr5e-3 -- --base-lr 5e-3
    python benchmarks/tune_embedded.py --table            # every run so far, as a Markdown table

Each run is ``recipes/fashion_mnist.py`` in its own process with the extra options given after
``--`` and its own ``--out`` under ``runs/tune/NAME``; one line per run (name, options, k-NN
top-1, optimizer steps, images/s, wall time, machine) is appended to ``runs/tune/results.jsonl``
so that BENCHMARKS.md can keep every setting tried, not only the winner. Run one at a time:
two runs on 2 cores slow each other and the time-planned schedules would shrink.
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


def run(name: str, options: list[str]) -> dict:
    """One recipe run; returns the row appended to the results file."""
    out = ROOT / "runs" / "tune" / name
    command = [sys.executable, str(ROOT / "recipes" / "fashion_mnist.py"), "--out", str(out), "--no-progress", *options]
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.stderr.write(done.stdout[-3000:] + done.stderr[-3000:])
        raise SystemExit(f"run {name!r} failed with exit status {done.returncode}")
    summary = json.loads((out / "summary.json").read_text())
    last = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    speeds = [row["images_per_s"] for row in last if "images_per_s" in row]
    row = dict(name=name, options=" ".join(options), knn_top1=summary.get("knn_top1"), summary=summary,
               images_per_s=max(speeds) if speeds else None, wall_s=round(wall, 1), machine=cpu_name(),
               date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as f:
        f.write(json.dumps(row) + "\n")
    return row


def table() -> str:
    """Every recorded run as a Markdown table."""
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    lines = ["| run | options | k-NN top-1 | img/s | wall |", "|---|---|---:|---:|---:|"]
    for r in rows:
        knn = f"{r['knn_top1']:.2f} %" if r["knn_top1"] is not None else "-"
        speed = f"{r['images_per_s']:.0f}" if r["images_per_s"] else "-"
        wall = f"{r['wall_s']:.0f} s" if r.get("wall_s") else "-"
        lines.append(f"| {r['name']} | `{r['options']}` | {knn} | {speed} | {wall} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", help="run name (its folder under runs/tune/)")
    parser.add_argument("--table", action="store_true", help="print every recorded run and exit")
    parser.add_argument("options", nargs=argparse.REMAINDER, help="recipe options, after --")
    args = parser.parse_args()
    if args.table:
        print(table())
        return
    if not args.name:
        parser.error("--name is required to run")
    options = args.options[1:] if args.options[:1] == ["--"] else args.options
    row = run(args.name, options)
    print(json.dumps({k: v for k, v in row.items() if k != "summary"}))


if __name__ == "__main__":
    main()
