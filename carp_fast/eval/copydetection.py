"""Copy detection on INRIA Copydays, "strong" subset (paper appendix D.6).

The paper runs DINO's ``eval_copy_detection.py`` (copied into the official code) without
distractors and without whitening:

- a Copydays folder as the official script reads it: ``original/*.jpg`` (157 images,
  the database) and ``strong/*.jpg`` (229 queries), each sorted by file name
  (``copydays_original/`` and ``copydays_strong/`` are accepted too);
- every image whole, squashed to 320 x 320 (bicubic, aspect ratio not kept), the
  backbone's average-pooled features (:func:`carp_fast.eval.data.squashed_batches`);
- L2-normalised features, cosine similarity, the 20 most similar originals per query;
- a query's positives: the originals whose file name starts with the same 4 characters
  (Copydays names an image ``<4-digit id><suffix>.jpg``);
- average precision of each query counted on those top 20 ranks only (Holidays'
  trapezoidal ``score_ap_from_ranks_1``: a positive outside the top 20 adds nothing, the
  number of positives still divides), averaged over the 229 queries.
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch

from .data import squashed_batches
from .frozen import FrozenBackbone, image_source
from .report import Report, sizes
from .retrieval import compute_ap, load_ground_truth, rank_database

TOP = 20  # ranks the official script scores (similarity.topk(20))
IMSIZE = 320  # the official --imsize
PREFIX = 4  # characters of the file name that name the original


class Copydays(NamedTuple):
    """Query and database image paths, and per query the database indices of its positives."""

    queries: list[str]
    database: list[str]
    positives: list[list[int]]


def load_copydays(root: str | os.PathLike, queries: str = "strong") -> Copydays:
    """Read a Copydays folder as distributed (``original/`` and ``strong/``).

    Args:
        root: the folder holding ``original/`` and ``<queries>/``.
        queries: the attacked block used as queries (the paper: ``"strong"``).

    Raises:
        FileNotFoundError: a missing block folder.
        ValueError: an empty block, or a query without any original of its prefix.
    """
    root = Path(root)
    blocks, folders = {}, {}
    for block in ("original", queries):
        # the official script's names, or the names of the INRIA tarballs' folders
        folder = next((root / n for n in (block, f"copydays_{block}") if (root / n).is_dir()), None)
        if folder is None:
            raise FileNotFoundError(
                f"Copydays folder {str(root)!r} has no {block}/ (or copydays_{block}/) sub-folder; expected "
                "the layout of the official script: original/*.jpg and strong/*.jpg"
            )
        names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".jpg"))
        if not names:
            raise ValueError(f"{folder} holds no .jpg images")
        blocks[block], folders[block] = names, folder
    originals = blocks["original"]
    positives = []
    for name in blocks[queries]:
        ok = [j for j, original in enumerate(originals) if original[:PREFIX] == name[:PREFIX]]
        if not ok:
            raise ValueError(f"query {queries}/{name} has no original sharing its prefix {name[:PREFIX]!r}")
        positives.append(ok)
    return Copydays(
        [str(folders[queries] / n) for n in blocks[queries]],
        [str(folders["original"] / n) for n in originals],
        positives,
    )


def copy_detection_map(
    query_features: torch.Tensor,
    database_features: torch.Tensor,
    positives: Sequence[Sequence[int]],
    *,
    top: int = TOP,
) -> float:
    """Mean over queries of the AP counted on the ``top`` best ranks, in percent.

    Args:
        query_features: ``[n_query, D]``.
        database_features: ``[n_db, D]``.
        positives: per query, the database indices of its originals (at least one).
        top: ranks scored (the official script: 20); a positive ranked lower adds no
            precision but still counts in the denominator.

    Returns:
        mAP in percent.
    """
    if len(positives) != len(query_features):
        raise ValueError(
            f"positives must hold one entry per query, got {len(positives)} for {len(query_features)}"
        )
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}")
    ranks = rank_database(query_features, database_features)[:top]  # [top, n_query]
    aps = []
    for q, ok in enumerate(positives):
        if len(ok) == 0:
            raise ValueError(f"query {q} has no positives; every Copydays query has an original")
        found = np.flatnonzero(np.isin(ranks[:, q], np.asarray(ok)))  # 0-based ranks, ascending
        aps.append(compute_ap(found, len(ok)))
    return 100.0 * float(np.mean(aps))


# --- carp-fast eval copydetection -----------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="Copydays folder as the official script reads it: original/*.jpg, strong/*.jpg")
    parser.add_argument("--ground-truth", type=Path, default=None, help="instead of --data: a JSON with queries, database, gnd [{'ok': [...]}]")
    parser.add_argument("--imsize", type=int, default=IMSIZE, help="images squashed to imsize x imsize (official 320)")
    parser.add_argument("--top", type=int, default=TOP, help="ranks counted by the AP (official 20)")


def run_from_args(args: argparse.Namespace, backbone: FrozenBackbone) -> Report:
    """mAP over the top ``--top`` of the Copydays queries (``--data``) or a ``--ground-truth``'s."""
    if (args.data is None) == (args.ground_truth is None):
        raise ValueError("pass either --data (a Copydays folder: original/, strong/) or --ground-truth (a JSON)")
    if args.data is not None:
        days = load_copydays(args.data)
        query_paths, database_paths, positives = days.queries, days.database, days.positives
        source = {"data": str(Path(args.data).resolve())}
    else:
        truth = load_ground_truth(args.ground_truth)
        query_paths, database_paths = truth.queries, truth.database
        positives = [entry["ok"] for entry in truth.gnd]
        source = {"ground_truth": str(args.ground_truth.resolve())}
    settings, (queries, database) = backbone.file_features(
        {"queries": query_paths, "database": database_paths},
        {"view": "squash", "imsize": args.imsize, "scales": [1.0], **image_source(args.ground_truth or args.data)},
        functools.partial(squashed_batches, size=args.imsize, batch_size=backbone.batch_size, workers=backbone.workers),
    )
    row = {"mAP": copy_detection_map(queries.features, database.features, positives, top=args.top)}
    protocol = {"variant": "paper", "imsize": args.imsize, "resize": "squashed to imsize x imsize, bicubic",
                "top": args.top, "queries": len(query_paths), "distractors": None, "whitening": None, **source}  # fmt: skip
    return Report("copy detection", [row], {**settings, **sizes(queries, database), **protocol})
