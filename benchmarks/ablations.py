"""CARP's ablations at small scale: block size, random vs fixed partitions, number of prototypes K.

    python benchmarks/ablations.py --k 4096 --block-size 4096 --batch 32 --steps 300 [--partition fixed] [--seed 1]
    python benchmarks/ablations.py --k 4096 --block-size 4096 --no-teacher --entropy-weight 2 --final-entropy-weight 1  # CARL

The paper's comparisons as one sweep with seeds, a table and a plot: ``benchmarks/ablation_suite.py``.

One run trains resnet10_tiny with CARP on a fixed Fashion-MNIST subset (2 x 28 px + 2 x 14 px
crops, AdamW) and measures, at the end: the loss terms, the perplexity of the teacher's
assignments of the last training batch, the prototypes the teacher assigns a fixed bank of
training images to (how many are used, their perplexity), whether carp_fast's
``CollapseWarning`` fired, and the k-NN top-1 (k = 20, T = 0.07) of the teacher's backbone on
queries against that bank: held-out training images by default (``eval_on="validation"``, the
split of ``pipelines/validation.py``, kept out of training and the bank), the test images with
``eval_on="test"``, once per chosen setting. Each run appends one JSON line to
``runs/ablations/results.jsonl`` (``--out``).

Notebook 02 (``notebooks/02_random_partitions.ipynb``) calls :func:`run_ablation` and
:func:`knn_at_init`; the numbers are discussed in ``BENCHMARKS.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root
from carp_fast.callbacks.carp_stats import CollapseWarning  # noqa: E402
from carp_fast.eval import extract_features, knn_accuracy  # noqa: E402
from carp_fast.carp import CARPConfig, build_model, carp_learner  # noqa: E402
from carp_fast.pipelines import (  # noqa: E402
    MultiCropConfig, crop_dataloaders, eval_loader, load_fashion_mnist, pretrain_loader,
)
from carp_fast.pipelines.validation import split_validation  # noqa: E402

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "runs" / "ablations" / "results.jsonl"
CROPS = MultiCropConfig(global_crops=2, global_size=28, local_crops=2, local_size=14,
                        global_scale=(0.3, 1.0), local_scale=(0.1, 0.3), blur_sigma=(0.1, 0.5))


@dataclass
class AblationSetting:
    """One configuration of the sweep."""

    n_prototypes: int = 4096  # K
    block_size: int = 4096  # B; B = K is one block (CARL when there is no teacher too)
    partition: str = "random"  # random | fixed
    teacher: bool = True  # False: no teacher network, the student's global crops detached are the targets (B.2 "w/o mom. enc.")
    entropy_weight: float = 1.0  # lambda_e (CARP: 1); the start of its cosine with final_entropy_weight
    final_entropy_weight: float | None = None  # lambda_e at the end; None: constant
    batch: int = 32
    steps: int = 300  # optimizer steps; the training subset is steps x batch images, seen once
    seed: int = 0  # initial weights, data order, partitions
    base_lr: float = 4e-3  # AdamW, per 256 images (peak lr = base_lr x batch / 256)
    teacher_momentum: float = 0.97  # start of the cosine to 1
    weight_decay: float = 0.05
    precision: str = "auto"  # bf16 on CPUs with bf16 units
    bank: int = 5_000  # k-NN bank (training images, labelled)
    queries: int = 2_000  # k-NN queries
    eval_on: str = "validation"  # queries from the validation split (tuning) or the test split (once per final setting)
    log_every: int = 10

    def label(self) -> str:
        """'K=4096 B=256 random', with the notes that apply: ' (one block)' when B = K, ' no teacher',
        ' (one block, no teacher: CARL)', and lambda_e when it is not 1; no seed."""
        one_block = self.n_prototypes // self.block_size == 1
        notes = (["one block"] if one_block else []) + ([] if self.teacher else ["no teacher"])
        text = f"K={self.n_prototypes} B={self.block_size} {self.partition}"
        if notes:
            text += f" ({', '.join(notes)}{': CARL' if one_block and not self.teacher else ''})"
        if self.entropy_weight != 1.0 or self.final_entropy_weight is not None:
            end = "" if self.final_entropy_weight is None else f"->{self.final_entropy_weight:g}"
            text += f" lambda_e={self.entropy_weight:g}{end}"
        return text

    def name(self) -> str:
        """:meth:`label` and the seed."""
        return f"{self.label()} seed={self.seed}"


def config_for(s: AblationSetting) -> CARPConfig:
    """The CARPConfig of one setting (resnet10_tiny, head 512 -> 128, AdamW, cosine lr); without a
    teacher and with one block it is CARL's (:class:`carp_fast.carl.CARLConfig` with these values)."""
    return CARPConfig(
        arch="resnet10_tiny", n_prototypes=s.n_prototypes, block_size=s.block_size, partition=s.partition,
        hidden_dim=512, embed_dim=128, optimizer="adamw", base_lr=s.base_lr, final_lr=s.base_lr * s.batch / 256 / 100,
        weight_decay=s.weight_decay, batch_size=s.batch, global_batch=s.batch, teacher_momentum=s.teacher_momentum,
        precision=s.precision, log_every=s.log_every, seed=s.seed, teacher=s.teacher, entropy_weight=s.entropy_weight,
        final_entropy_weight=s.final_entropy_weight,
    )


_CACHE: dict = {}
COLLAPSED_BANK_PERPLEXITY = 10.0  # 5,000 images of 10 classes on fewer than ~10 prototypes


EVAL_SPLITS = ("validation", "test")


def fashion_mnist(split: str):
    """Fashion-MNIST as an ArraySource (loaded once per process): ``"train"`` (the 50k training
    images outside the validation split), ``"validation"`` (the 10k held out) or ``"test"``."""
    if split not in _CACHE:
        if split == "test":
            _CACHE[split] = load_fashion_mnist("test")
        else:
            _CACHE["train"], _CACHE["validation"] = split_validation(load_fashion_mnist("train"))
    return _CACHE[split]


def knn_loaders(bank: int, queries: int, eval_on: str = "validation"):
    """(bank loader, query loader): fixed subsets of the training images (outside the validation
    split) and of the ``eval_on`` split's images."""
    if eval_on not in EVAL_SPLITS:
        raise ValueError(f"eval_on must be one of {EVAL_SPLITS}, got {eval_on!r}")
    bank_dl = eval_loader(fashion_mnist("train").subset(bank, seed=1), size=28, resize=None, batch_size=500)
    query_dl = eval_loader(fashion_mnist(eval_on).subset(queries, seed=2), size=28, resize=None, batch_size=500)
    return bank_dl, query_dl


def train_loader(s: AblationSetting):
    """fastai DataLoaders over the run's training subset (steps x batch images, seeded; never the
    validation images)."""
    images = fashion_mnist("train").subset(s.steps * s.batch, seed=100 + s.seed)
    return crop_dataloaders(pretrain_loader(images, CROPS, batch_size=s.batch, seed=s.seed))


def usage(counts: torch.Tensor) -> tuple[int, float]:
    """(prototypes used, perplexity) of a histogram of assignments."""
    p = counts.double() / counts.sum()
    return int((counts > 0).sum()), math.exp(-torch.special.xlogy(p, p).sum().item())


def knn_at_init(seed: int = 0, bank: int = 5_000, queries: int = 2_000, eval_on: str = "validation") -> float:
    """k-NN top-1 (%) of the teacher's backbone at the random initialisation of ``seed``."""
    torch.manual_seed(seed)
    backbone = build_model(config_for(AblationSetting(n_prototypes=64, block_size=64, seed=seed))).teacher.backbone
    bank_dl, query_dl = knn_loaders(bank, queries, eval_on)
    b = extract_features(backbone, bank_dl, progress=False)
    q = extract_features(backbone, query_dl, progress=False)
    return knn_accuracy(b.features, b.labels, q.features, q.labels, k=20, temperature=0.07).top1


@dataclass
class AblationResult:
    setting: AblationSetting
    loss: float
    consistency: float
    entropy: float
    batch_perplexity: float  # teacher assignments of the last logged batch (2 x batch views)
    batch_prototypes_hit: int
    bank_prototypes_used: int  # teacher arg-max over all K for the bank images
    bank_perplexity: float
    collapse_warning: bool
    collapsed: bool  # bank perplexity below 10 (a handful of prototypes), or the CollapseWarning fired
    knn_top1: float
    seconds: float
    history: list = field(default_factory=list)  # step, loss, perplexity, prototypes_hit

    def row(self) -> dict:
        """A flat dict (no history) for tables."""
        d = {k: v for k, v in asdict(self).items() if k not in ("setting", "history")}
        return {**asdict(self.setting), **d}


def run_ablation(setting: AblationSetting | None = None, *, out: str | Path | None = DEFAULT_OUT,
                 verbose: bool = True, **overrides) -> AblationResult:
    """Train one setting (fields of :class:`AblationSetting` as keywords) and measure it.

    Appends the result as one JSON line to ``out`` (None: nothing written).
    """
    s = AblationSetting(**{**(asdict(setting) if setting else {}), **overrides})
    start = time.perf_counter()
    torch.manual_seed(s.seed)  # initial weights
    learn = carp_learner(train_loader(s), config_for(s), progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", CollapseWarning)
        learn.fit(1)
    collapse_warning = any(issubclass(w.category, CollapseWarning) for w in caught)
    teacher = learn.model.teacher.eval()  # the student itself when there is no teacher (eta = 0)
    bank_dl, query_dl = knn_loaders(s.bank, s.queries, s.eval_on)
    bank = extract_features(teacher.backbone, bank_dl, progress=False)
    queries = extract_features(teacher.backbone, query_dl, progress=False)
    with torch.no_grad():
        assignments = teacher.prototypes(teacher.head(bank.features)).argmax(1)
    counts = torch.bincount(assignments, minlength=s.n_prototypes)
    used, bank_ppl = usage(counts)
    knn = knn_accuracy(bank.features, bank.labels, queries.features, queries.labels, k=20, temperature=0.07)
    last = learn.carp_stats.history[-1]
    history = [dict(step=h["step"], loss=round(h["loss"], 4), perplexity=round(h["perplexity"], 2),
                    prototypes_hit=int(h["prototypes_hit"])) for h in learn.carp_stats.history]
    result = AblationResult(
        setting=s, loss=last["loss"], consistency=last["consistency"], entropy=last["entropy"],
        batch_perplexity=last["perplexity"], batch_prototypes_hit=int(last["prototypes_hit"]),
        bank_prototypes_used=used, bank_perplexity=bank_ppl, collapse_warning=collapse_warning,
        collapsed=collapse_warning or bank_ppl < COLLAPSED_BANK_PERPLEXITY,
        knn_top1=knn.top1, seconds=time.perf_counter() - start, history=history,
    )
    if verbose:
        print(f"{s.name()}: k-NN top-1 {knn.top1:.1f} %, loss {last['loss']:.3f}, batch perplexity "
              f"{last['perplexity']:.1f}, bank: {used} prototypes used, perplexity {bank_ppl:.1f}"
              + (", COLLAPSED" if result.collapsed else "") + f" ({result.seconds:.0f} s)", flush=True)
    if out is not None:
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write(json.dumps({**asdict(result), "setting": asdict(s), "name": s.name(),
                                "date": time.strftime("%Y-%m-%dT%H:%M:%S")}) + "\n")
    return result


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = AblationSetting()
    p.add_argument("--k", type=int, default=d.n_prototypes)
    p.add_argument("--block-size", type=int, nargs="+", default=[d.block_size], help="one run per value")
    p.add_argument("--partition", default=d.partition, choices=("random", "fixed"))
    p.add_argument("--teacher", action=argparse.BooleanOptionalAction, default=d.teacher,
                   help="--no-teacher: the student's own global crops, detached, are the targets")
    p.add_argument("--entropy-weight", type=float, default=d.entropy_weight, help="lambda_e (its start with --final-entropy-weight)")
    p.add_argument("--final-entropy-weight", type=float, default=d.final_entropy_weight, help="lambda_e at the end of its cosine")
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--seed", type=int, nargs="+", default=[d.seed], help="one run per value")
    p.add_argument("--base-lr", type=float, default=d.base_lr)
    p.add_argument("--teacher-momentum", type=float, default=d.teacher_momentum)
    p.add_argument("--precision", default=d.precision)
    p.add_argument("--bank", type=int, default=d.bank)
    p.add_argument("--queries", type=int, default=d.queries)
    p.add_argument("--eval-on", default=d.eval_on, choices=EVAL_SPLITS,
                   help="k-NN queries from the validation split (tuning) or the test split (once per final setting)")
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--init-knn", action="store_true", help="also print the k-NN top-1 at random init")
    a = p.parse_args(argv)
    if a.init_knn:
        print(f"k-NN top-1 at random init: {knn_at_init(a.seed[0], a.bank, a.queries, a.eval_on):.1f} %")
    for seed in a.seed:
        for block_size in a.block_size:
            run_ablation(n_prototypes=a.k, block_size=min(block_size, a.k), partition=a.partition, teacher=a.teacher,
                         entropy_weight=a.entropy_weight, final_entropy_weight=a.final_entropy_weight, batch=a.batch,
                         steps=a.steps, seed=seed, base_lr=a.base_lr, teacher_momentum=a.teacher_momentum,
                         precision=a.precision, bank=a.bank, queries=a.queries, eval_on=a.eval_on, out=a.out)


if __name__ == "__main__":
    main()
