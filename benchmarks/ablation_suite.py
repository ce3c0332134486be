"""The CARP paper's partition ablations at embedded scale, over seeds: a table and a plot.

    python benchmarks/ablation_suite.py --seeds 0 1 2                 # (a), (b) and (c): hours on 2 CPU cores
    python benchmarks/ablation_suite.py --suites c --carl-weights 1 2:1 4:1 --seeds 0 1 2
    python benchmarks/ablation_suite.py --quick                       # tiny sizes, under a minute: does it run

(a) table B.2 in shape: block sizes from small to K, each with the EMA teacher and without one
    (the student's own global crops, detached, are the targets); the last column, one block
    without a teacher, is CARL with lambda_e = 1;
(b) section 6.2: partitions drawn anew each step against one partition fixed for the run, at
    2-3 training lengths (optimizer steps; every image is seen once, so a longer run also sees
    more images);
(c) CARL (no teacher, one block of all K) with each lambda_e schedule of ``--carl-weights``
    (``2:1``: a cosine from 2 to 1; ``1``: constant).

Each run is :func:`benchmarks.ablations.run_ablation` (resnet10_tiny, Fashion-MNIST, AdamW,
k-NN top-1 with k = 20, T = 0.07 on a fixed bank of training images). Writes,
under ``--out``: ``results.jsonl`` (one line per run; a run already there with the same setting and
seed is read back, not trained again, so an interrupted suite goes on where it stopped),
``table.md`` (mean and standard deviation over the seeds, collapsed runs, the paper's number
beside each row, and the same network at each seed's random initialisation as the reference
row) and ``ablations.png``.

The k-NN queries are validation images by default (``--eval-on validation``: training images
held out of every run's training and bank, ``pipelines/validation.py``): choose settings (CARL's
lambda_e) there, then measure the chosen ones once on the test images (``--eval-on test``).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from dataclasses import asdict, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from benchmarks.ablations import EVAL_SPLITS, AblationSetting, knn_at_init, run_ablation  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "runs" / "ablations" / "suite"

# The paper's numbers (ImageNet, ResNet-50, k-NN top-1 %), to set beside ours in shape only.
PAPER_B2_BLOCKS = (32, 64, 128, 256, 512, 1024, 2048, 4096, 16384, 65536)  # N_B, K = 65,536, 50 epochs
PAPER_B2 = {
    True: (49.56, 50.75, 51.19, 51.20, 51.32, 51.06, 51.31, 51.08, 49.67, 0.11),  # "w/ mom. enc."
    False: (48.95, 49.28, 48.81, 47.37, 46.16, 44.68, 44.29, 44.39, 47.25, 0.11),  # "w/o mom. enc."
}
PAPER_62_EPOCHS = (25, 50, 75, 100)  # section 6.2, N_B = 512 of K = 65,536
PAPER_62 = {"fixed": (45.15, 49.89, 52.81, 53.32), "random": (48.68, 53.98, 55.93, 56.38)}

SIZES = {
    # K, batch, block sizes (a), lengths in optimizer steps (b), B of (b), steps of (a) and (c), k-NN bank and queries
    "full": dict(k=4096, batch=32, blocks=(16, 64, 256, 1024, 4096), lengths=(150, 300, 600), b_block=256, steps=300,
                 bank=5_000, queries=2_000),
    "quick": dict(k=64, batch=16, blocks=(8, 64), lengths=(2, 4), b_block=8, steps=2, bank=200, queries=100),
}


def parse_weight(text: str) -> tuple[float, float | None]:
    """``"2:1"`` -> (2.0, 1.0), a cosine from 2 to 1; ``"1"`` -> (1.0, None), constant."""
    start, _, end = text.partition(":")
    return float(start), (float(end) if end else None)


def settings(suites: list[str], size: dict, carl_weights: list[str], eval_on: str = "validation") -> list[tuple[str, AblationSetting]]:
    """``(suite, setting)`` for every run of ``suites``, seed 0 (the caller sets the seed)."""
    base = AblationSetting(n_prototypes=size["k"], batch=size["batch"], steps=size["steps"], bank=size["bank"],
                           queries=size["queries"], eval_on=eval_on)
    runs = []
    if "a" in suites:
        runs += [("a", replace(base, block_size=b, teacher=t)) for t in (True, False) for b in size["blocks"]]
    if "b" in suites:
        runs += [("b", replace(base, block_size=size["b_block"], partition=p, steps=n))
                 for p in ("random", "fixed") for n in size["lengths"]]
    if "c" in suites:
        for text in carl_weights:
            start, end = parse_weight(text)
            runs.append(("c", replace(base, block_size=size["k"], teacher=False, entropy_weight=start, final_entropy_weight=end)))
    return runs


def setting_key(setting: dict) -> str:
    """A setting as text that two equal settings share."""
    return json.dumps(setting, sort_keys=True)


def finished_runs(results: Path) -> dict[str, tuple[float, bool]]:
    """``{setting_key: (k-NN top-1, collapsed)}`` of the runs already in ``results`` (none if it is absent);
    a later line of the same setting wins."""
    if not results.exists():
        return {}
    done = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        done[setting_key(r["setting"])] = (r["knn_top1"], r["collapsed"])
    return done


def summarise(rows: list[dict]) -> list[dict]:
    """One row per (suite, setting): mean and standard deviation of k-NN top-1 over its seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        label = r["label"] + (f", {r['setting']['steps']} steps" if r["suite"] == "b" else "")
        groups.setdefault((r["suite"], label), []).append(r)
    table = []
    for (suite, label), runs in groups.items():
        top1 = [r["knn_top1"] for r in runs]
        s = runs[0]["setting"]
        table.append(dict(
            suite=suite, label=label, setting=s, seeds=len(runs), knn_mean=statistics.fmean(top1),
            knn_std=statistics.stdev(top1) if len(top1) > 1 else 0.0, collapsed=sum(r["collapsed"] for r in runs),
            paper=paper_number(suite, s),
        ))
    return table


def random_init_row(seeds: list[int], size: dict, eval_on: str) -> dict:
    """The table's reference row: the k-NN of the same network untrained, at each seed's initialisation."""
    top1 = [knn_at_init(seed, size["bank"], size["queries"], eval_on) for seed in seeds]
    return dict(suite="-", label="random initialisation (no training)", setting={}, seeds=len(top1),
                knn_mean=statistics.fmean(top1), knn_std=statistics.stdev(top1) if len(top1) > 1 else 0.0,
                collapsed=0, paper="-")


def paper_number(suite: str, s: dict) -> str:
    """The paper's cell that a row stands beside, in words (the scales differ: shape only)."""
    if suite == "a":
        row = PAPER_B2[s["teacher"]]
        if s["block_size"] == s["n_prototypes"]:
            return f"{row[-1]} (N_B = K)"
        return f"{min(row[:-1])}-{max(row[:-1])} over N_B 32-16384 (K = 65,536)"
    if suite == "b":
        values = PAPER_62[s["partition"]]
        return f"{values[0]} / {values[-1]} at 25 / 100 epochs"
    return "0.11 (B.2, N_B = K, no teacher, lambda_e unknown)"


def write_table(table: list[dict], path: Path, command: str) -> str:
    """``table.md``: one Markdown row per setting; returns the text."""
    lines = [f"`{command}`", "", "| suite | setting | seeds | k-NN top-1 % (mean ± std) | collapsed | paper (ImageNet) |",
             "|---|---|---|---|---|---|"]
    for t in table:
        lines.append(f"| {t['suite']} | {t['label']} | {t['seeds']} | {t['knn_mean']:.1f} ± {t['knn_std']:.1f} | "
                     f"{t['collapsed']} of {t['seeds']} | {t['paper']} |")
    text = "\n".join(lines) + "\n"
    path.write_text(text)
    return text


def plot(table: list[dict], path: Path) -> None:
    """``ablations.png``: (a) k-NN against block size with and without the teacher, (b) random
    against fixed over training length, (c) CARL per lambda_e schedule; error bars: std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for teacher, name in ((True, "with teacher"), (False, "no teacher")):
        rows = sorted((t for t in table if t["suite"] == "a" and t["setting"]["teacher"] == teacher), key=lambda t: t["setting"]["block_size"])
        if rows:
            axes[0].errorbar([t["setting"]["block_size"] for t in rows], [t["knn_mean"] for t in rows],
                             yerr=[t["knn_std"] for t in rows], marker="o", capsize=3, label=name)
    axes[0].set(xscale="log", xlabel="block size B (B = K: one block)", ylabel="k-NN top-1 %", title="(a) table B.2 in shape")
    for partition in ("random", "fixed"):
        rows = sorted((t for t in table if t["suite"] == "b" and t["setting"]["partition"] == partition), key=lambda t: t["setting"]["steps"])
        if rows:
            axes[1].errorbar([t["setting"]["steps"] for t in rows], [t["knn_mean"] for t in rows],
                             yerr=[t["knn_std"] for t in rows], marker="o", capsize=3, label=partition)
    axes[1].set(xlabel="optimizer steps", ylabel="k-NN top-1 %", title="(b) section 6.2: random vs fixed")
    rows = [t for t in table if t["suite"] == "c"]
    if rows:
        axes[2].errorbar(range(len(rows)), [t["knn_mean"] for t in rows], yerr=[t["knn_std"] for t in rows], fmt="o", capsize=3)
        axes[2].set_xticks(range(len(rows)), [t["label"].split("lambda_e=")[-1] if "lambda_e" in t["label"] else "1" for t in rows])
    axes[2].set(xlabel="lambda_e (start->end)", ylabel="k-NN top-1 %", title="(c) CARL")
    for t in table:
        if t["suite"] == "-":  # the untrained network, the floor every panel is read against
            for ax in axes:
                ax.axhline(t["knn_mean"], color="grey", linestyle="--", label="random init")
    for ax in axes[:2]:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--suites", nargs="+", default=["a", "b", "c"], choices=("a", "b", "c"))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--carl-weights", nargs="+", default=["1", "2:1", "4:1"], help="lambda_e schedules of (c): START[:END]")
    p.add_argument("--quick", action="store_true", help="tiny sizes (K = 64, 2-4 steps, small bank) and one seed: a check that it runs")
    p.add_argument("--eval-on", default="validation", choices=EVAL_SPLITS,
                   help="k-NN queries: the validation split (choices) or the test split (once per final setting)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    a = p.parse_args(argv)
    size = SIZES["quick" if a.quick else "full"]
    seeds = a.seeds[:1] if a.quick else a.seeds
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = finished_runs(results)
    rows = []
    for suite, setting in settings(a.suites, size, a.carl_weights, a.eval_on):
        for seed in seeds:
            s = replace(setting, seed=seed)
            if (key := setting_key(asdict(s))) in done:  # an interrupted suite goes on where it stopped
                knn_top1, collapsed = done[key]
                print(f"{s.name()}: k-NN top-1 {knn_top1:.1f} % (from {results})", flush=True)
            else:
                result = run_ablation(s, out=results)
                knn_top1, collapsed = done[key] = result.knn_top1, result.collapsed  # e.g. (c)'s lambda_e = 1 is (a)'s CARL
            rows.append(dict(suite=suite, label=s.label(), setting=vars(s), knn_top1=knn_top1, collapsed=collapsed))
    table = summarise(rows) + [random_init_row(seeds, size, a.eval_on)]
    command = "python benchmarks/ablation_suite.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(write_table(table, out / "table.md", command.strip()))
    plot(table, out / "ablations.png")
    (out / "summary.json").write_text(json.dumps(table, indent=2) + "\n")
    return table


if __name__ == "__main__":
    main()
