"""Image retrieval mAP on revisited Oxford / Paris (paper appendix D.5).

The paper runs DINO's ``eval_image_retrieval.py`` with ``--imsize 512 --multiscale 1``:

- every query and database image whole (queries are not cropped to their boxes), aspect
  ratio kept, shrunk with PIL ``thumbnail`` so its longer side is 512 (Lanczos), one
  image at a time (:func:`carp_fast.eval.data.thumbnail_batches`);
- features averaged over the scales 1, 1/sqrt(2), 1/2 — the input tensor resized
  bilinearly by each factor — then L2-normalised (:class:`MultiScale`);
- database images ranked by cosine similarity, scored with revisitop's ``compute_map``
  (:func:`compute_map` is a port) under the protocols built from each query's
  ``easy``, ``hard`` and ``junk`` lists:

  - Easy:   positives = easy,         ignored (junk) = junk + hard;
  - Medium: positives = easy + hard,  ignored = junk;
  - Hard:   positives = hard,         ignored = junk + easy.

  Junk images are removed from the ranking before average precision is computed. A
  query with no positives is skipped (NaN AP) and left out of the mean. The paper
  reports Medium and Hard.

Ground truth: revisitop's own ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` read as
distributed (``imlist`` / ``qimlist`` names without extension, images in ``jpg/`` beside
the pickle; :func:`load_revisitop`), or a JSON file for other data sets
(:func:`load_ground_truth`), image paths relative to the file's folder::

    {"queries": ["query/0001.jpg", ...], "database": ["db/0001.jpg", ...],
     "gnd": [{"easy": [3, 17], "hard": [5], "junk": [8]}, ...]}   # 0-based database indices
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import pickle
from pathlib import Path
from typing import Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import thumbnail_batches
from .features import check_same_dim
from .frozen import FrozenBackbone, image_source
from .report import Report, add_variant_argument, sizes

KAPPAS = (1, 5, 10)  # mP@k reported by revisitop / DINO
IMSIZE = 512  # longer side, DINO's --imsize as the paper runs it
SCALES = (1.0, 1 / math.sqrt(2), 0.5)  # DINO's multi_scale
REVISITOP = ("roxford5k", "rparis6k")


class GroundTruth(NamedTuple):
    """Query and database image paths (absolute) and one ground-truth dict per query."""

    queries: list[str]
    database: list[str]
    gnd: list[dict[str, list[int]]]


class RetrievalResult(NamedTuple):
    """mAP (percent) under the Easy / Medium / Hard protocols, and mP@k per protocol."""

    map_easy: float
    map_medium: float
    map_hard: float
    mp_at: dict[str, dict[int, float]]


def load_ground_truth(path: str | os.PathLike) -> GroundTruth:
    """Read a ground truth: revisitop's ``gnd_*.pkl`` (:func:`load_revisitop`), a folder
    holding one, or a JSON file (format in the module docstring; paths made absolute)."""
    if Path(path).suffix == ".pkl" or Path(path).is_dir():
        return load_revisitop(path)
    path = Path(path)
    with open(path) as f:
        spec = json.load(f)
    queries = spec.get("queries", spec.get("qimlist"))
    database = spec.get("database", spec.get("imlist"))
    gnd = spec.get("gnd")
    if queries is None or database is None or gnd is None:
        raise ValueError(
            f"{path}: expected keys 'queries', 'database' and 'gnd', got {sorted(spec)}"
        )
    root = path.parent
    return _checked(path, [str(root / q) for q in queries], [str(root / d) for d in database], list(gnd))


def load_revisitop(path: str | os.PathLike) -> GroundTruth:
    """Read revisitop's ``gnd_<dataset>.pkl`` as distributed.

    Args:
        path: the pickle (``.../roxford5k/gnd_roxford5k.pkl``) or the folder holding it.

    Returns:
        :class:`GroundTruth`: query and database paths ``<folder>/jpg/<name>.jpg``
        (``qimlist`` and ``imlist``), and per query ``{"easy", "hard", "junk"}`` lists of
        database indices (the query boxes ``bbx`` are not used: DINO feeds whole images).

    Raises:
        FileNotFoundError: no pickle, or a listed image missing from ``jpg/``.
        ValueError: a pickle without ``imlist`` / ``qimlist`` / ``gnd``, or with indices
            outside the database.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(path.glob("gnd_*.pkl"))
        if not found:
            raise FileNotFoundError(f"{path}: no gnd_*.pkl (revisitop ground truth) in this folder")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"ground truth {str(path)!r} does not exist")
    with open(path, "rb") as f:
        spec = _RevisitopUnpickler(f, encoding="latin1").load()  # latin1: numpy arrays of Python 2 pickles
    if not isinstance(spec, Mapping) or not {"imlist", "qimlist", "gnd"} <= set(spec):
        keys = sorted(spec) if isinstance(spec, Mapping) else type(spec).__name__
        raise ValueError(f"{path}: expected revisitop keys 'imlist', 'qimlist' and 'gnd', got {keys}")
    images = path.parent / "jpg"
    queries = [str(images / f"{name}.jpg") for name in spec["qimlist"]]
    database = [str(images / f"{name}.jpg") for name in spec["imlist"]]
    gnd = [
        {key: [int(i) for i in np.asarray(entry.get(key, []), dtype=np.int64).ravel()] for key in ("easy", "hard", "junk")}
        for entry in spec["gnd"]
    ]
    truth = _checked(path, queries, database, gnd)
    missing = [p for p in truth.queries + truth.database if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"{path}: {len(missing)} listed image(s) missing from {images}, e.g. {missing[:3]}")
    return truth


class _RevisitopUnpickler(pickle.Unpickler):
    """Unpickles builtins and numpy arrays only: a data file must not run code."""

    def find_class(self, module: str, name: str):
        if module.split(".")[0] == "numpy" and name in ("_reconstruct", "ndarray", "dtype", "scalar"):
            return super().find_class(module, name)
        if module.startswith("numpy") and name.endswith("DType"):  # numpy 2 dtype classes
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"ground truth pickles {module}.{name}: only lists, dicts and numpy arrays are read")


def _checked(path: Path, queries: list[str], database: list[str], gnd: list[dict]) -> GroundTruth:
    """Raise a ValueError naming ``path`` unless ``gnd`` has one entry per query and
    every index is a database position."""
    if len(gnd) != len(queries):
        raise ValueError(f"{path}: 'gnd' has {len(gnd)} entries for {len(queries)} queries")
    for i, entry in enumerate(gnd):
        for key, ids in entry.items():
            if key == "bbx":
                continue  # revisitop query boxes: not used (whole query images)
            bad = [j for j in ids if not 0 <= j < len(database)]
            if bad:
                raise ValueError(
                    f"{path}: gnd[{i}][{key!r}] holds indices {bad[:5]} outside the "
                    f"database of {len(database)} images"
                )
    return GroundTruth(queries, database, list(gnd))


class MultiScale(nn.Module):
    """Features averaged over input scales, then L2-normalised (DINO ``multi_scale``).

    For each scale s the image batch ``[N, 3, H, W]`` is resized by the factor s
    (bilinear, ``align_corners=False``, as ``F.interpolate(scale_factor=s)``; s = 1 is
    the image itself), fed to ``backbone``, and the ``[N, D]`` outputs are averaged and
    L2-normalised per row (DINO normalises the whole tensor: the same at its batch of 1).
    """

    def __init__(self, backbone: nn.Module, scales: Sequence[float] = SCALES):
        super().__init__()
        self.backbone, self.scales = backbone, tuple(float(s) for s in scales)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for scale in self.scales:
            x = images if scale == 1 else F.interpolate(images, scale_factor=scale, mode="bilinear", align_corners=False)
            total = total + self.backbone(x)  # [N, D]
        return F.normalize(total / len(self.scales), dim=1)


def rank_database(query_features: torch.Tensor, database_features: torch.Tensor) -> np.ndarray:
    """Database indices by decreasing cosine similarity, revisitop layout.

    Args:
        query_features: ``[n_query, D]``.
        database_features: ``[n_db, D]``.

    Returns:
        ``ranks [n_db, n_query]``: column q lists database indices, most similar first.
    """
    check_same_dim(query_features, database_features, ("query_features", "database_features"))
    q = F.normalize(query_features.double(), dim=1)
    db = F.normalize(database_features.double(), dim=1)
    scores = db @ q.T  # [n_db, n_query]
    # stable sort: equal scores keep database order, so ties rank deterministically
    return torch.sort(scores, dim=0, descending=True, stable=True).indices.numpy()


def compute_ap(ranks: Sequence[int], nres: int) -> float:
    """Average precision of one query, trapezoidal (revisitop ``compute_ap``).

    Args:
        ranks: 0-based positions of the positives in the ranking (junk already removed),
            ascending.
        nres: number of positives for the query.

    Returns:
        AP in [0, 1]: the area under the precision-recall curve, where each positive adds
        a trapezoid of width ``1 / nres`` between the precision just before and just
        after it.
    """
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else j / rank
        precision_1 = (j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def compute_map(
    ranks: np.ndarray, gnd: Sequence[Mapping[str, Sequence[int]]], kappas: Sequence[int] = ()
) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean average precision over queries (port of revisitop ``compute_map``).

    Args:
        ranks: ``[n_db, n_query]`` database indices per query, best first.
        gnd: per query ``{"ok": positives, "junk": ignored}`` database indices.
        kappas: k for the mean precision at k (mP@k).

    Returns:
        ``(mAP, aps [n_query], mP@k [len(kappas)], P@k [n_query, len(kappas)])``; a query
        without positives has NaN AP and is left out of the means. mAP is NaN when no
        query has positives.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(
            f"ranks must be [n_db, n_query] with n_query = len(gnd) = {len(gnd)}, "
            f"got shape {list(ranks.shape)}"
        )
    aps = np.full(len(gnd), np.nan)
    prs = np.full((len(gnd), len(kappas)), np.nan)
    for i, entry in enumerate(gnd):
        positives = np.asarray(entry["ok"], dtype=np.int64)
        if len(positives) == 0:
            continue
        junk = np.asarray(entry.get("junk", []), dtype=np.int64)
        pos = np.flatnonzero(np.isin(ranks[:, i], positives))  # positions, ascending
        junk_pos = np.flatnonzero(np.isin(ranks[:, i], junk))
        # Junk ranked before a positive does not count: shift it up one place per junk.
        pos = pos - np.searchsorted(junk_pos, pos)
        aps[i] = compute_ap(pos, len(positives))
        pos_1 = pos + 1  # 1-based
        for j, kappa in enumerate(kappas):
            kq = min(int(pos_1.max()), kappa)
            prs[i, j] = (pos_1 <= kq).sum() / kq
    valid = ~np.isnan(aps)
    if not valid.any():
        return math.nan, aps, np.full(len(kappas), np.nan), prs
    return float(aps[valid].mean()), aps, prs[valid].mean(0), prs


def retrieval_map(
    query_features: torch.Tensor,
    database_features: torch.Tensor,
    gnd: Sequence[Mapping[str, Sequence[int]]],
    *,
    kappas: Sequence[int] = KAPPAS,
) -> RetrievalResult:
    """Revisited Oxford / Paris mAP under the Easy, Medium and Hard protocols.

    Args:
        query_features: ``[n_query, D]``.
        database_features: ``[n_db, D]``.
        gnd: per query ``{"easy": [...], "hard": [...], "junk": [...]}`` database indices.
        kappas: k for mP@k.

    Returns:
        :class:`RetrievalResult`, mAP and mP@k in percent.
    """
    if len(gnd) != len(query_features):
        raise ValueError(
            f"gnd must hold one entry per query, got {len(gnd)} for {len(query_features)}"
        )
    ranks = rank_database(query_features, database_features)
    protocols = {
        "easy": [{"ok": g["easy"], "junk": [*g["junk"], *g["hard"]]} for g in gnd],
        "medium": [{"ok": [*g["easy"], *g["hard"]], "junk": g["junk"]} for g in gnd],
        "hard": [{"ok": g["hard"], "junk": [*g["junk"], *g["easy"]]} for g in gnd],
    }
    maps, mp_at = {}, {}
    for name, protocol_gnd in protocols.items():
        mean_ap, _, mpr, _ = compute_map(ranks, protocol_gnd, kappas)
        maps[name] = 100.0 * mean_ap
        mp_at[name] = {k: 100.0 * float(p) for k, p in zip(kappas, mpr)}
    return RetrievalResult(maps["easy"], maps["medium"], maps["hard"], mp_at)


# --- carp-fast eval retrieval ---------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--ground-truth", type=Path, required=True, help="revisitop's gnd_roxford5k.pkl / gnd_rparis6k.pkl (images in jpg/ beside it), or a JSON (see carp_fast.eval.retrieval)")
    add_variant_argument(parser, "paper: whole image, longer side --imsize, 3 scales; fast: a --size centre crop at one scale (not the paper's)")
    parser.add_argument("--imsize", type=int, default=IMSIZE, help="paper: longer side of each image (DINO --imsize)")
    parser.add_argument("--multiscale", action=argparse.BooleanOptionalAction, default=True, help="paper: average features over scales 1, 1/sqrt(2), 1/2")


def run_from_args(args: argparse.Namespace, backbone: FrozenBackbone) -> Report:
    """mAP (Easy / Medium / Hard) and mP@k of the ``--ground-truth`` queries."""
    from ..device import cudnn_benchmark

    truth = load_ground_truth(args.ground_truth)
    images = {"queries": truth.queries, "database": truth.database}
    if args.variant == "paper":
        scales = SCALES if args.multiscale else (1.0,)
        with cudnn_benchmark(False):  # whole images, each of its own size: no autotuning per shape
            settings, (queries, database) = backbone.file_features(
                images,
                {"view": "thumbnail", "imsize": args.imsize, "scales": list(scales), **image_source(args.ground_truth)},
                functools.partial(thumbnail_batches, imsize=args.imsize, workers=backbone.workers),
                wrap=functools.partial(MultiScale, scales=scales) if len(scales) > 1 else None,
            )
        protocol = {"variant": "paper", "imsize": args.imsize, "multiscale": args.multiscale,
                    "scales": list(scales), "resize": "PIL thumbnail (longer side = imsize, Lanczos)"}  # fmt: skip
    else:
        size = args.size or 224
        resize = args.resize or size  # the shorter side to `size`, then the centre square
        settings, (queries, database) = backbone.file_features(
            images, {"size": size, "resize": resize, **image_source(args.ground_truth)}, backbone.centre_crops(size, resize)
        )
        protocol = {"variant": "fast", "not_the_paper": "a centre crop at one scale"}
    result = retrieval_map(queries.features, database.features, truth.gnd)
    row = {"mAP_easy": result.map_easy, "mAP_medium": result.map_medium, "mAP_hard": result.map_hard}
    for name, values in result.mp_at.items():
        row.update({f"mP@{k}_{name}": v for k, v in values.items()})
    protocol["ground_truth"] = str(args.ground_truth.resolve())
    return Report("retrieval", [row], {**settings, **sizes(queries, database), **protocol})
