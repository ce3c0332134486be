"""Image retrieval and copy detection mAP (paper appendix D.5, D.6).

Retrieval follows the revisited Oxford / Paris protocol (Radenović et al., 2018) as run
by DINO's ``eval_image_retrieval.py``: database images are ranked by cosine similarity
to each query, and :func:`compute_map` (a port of revisitop's ``compute_map``) scores the
ranking under three protocols built from each query's ``easy``, ``hard`` and ``junk``
lists:

- Easy:   positives = easy,         ignored (junk) = junk + hard;
- Medium: positives = easy + hard,  ignored = junk;
- Hard:   positives = hard,         ignored = junk + easy.

Junk images are removed from the ranking before average precision is computed (a
positive ranked after j junk images moves up j places). A query with no positives is
skipped (its AP is NaN) and excluded from the mean.

Copy detection (DINO ``eval_copy_detection.py``, INRIA Copydays "strong" subset, without
distractors or whitening as in the paper) ranks the database by cosine similarity too and
reports the mAP over queries, each query's positives being its original image(s).

Ground-truth file format (JSON), image paths relative to the file's directory::

    {
      "queries":  ["query/0001.jpg", ...],          # n_query paths
      "database": ["db/0001.jpg", ...],             # n_db paths
      "gnd": [                                       # one entry per query
        {"easy": [3, 17], "hard": [5], "junk": [8]},   # retrieval: database indices
        ...
      ]
    }

For copy detection an entry is ``{"ok": [db indices]}`` (``"junk"`` optional). Indices
are 0-based positions in ``"database"``. Revisitop's own pickles use the same ``gnd``
entries (keys ``qimlist`` / ``imlist`` for the lists, also accepted here).
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .features import check_same_dim

KAPPAS = (1, 5, 10)  # mP@k reported by revisitop / DINO


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
    """Read a ground-truth JSON (format in the module docstring); paths made absolute."""
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
    root = path.parent
    return GroundTruth(
        [str(root / q) for q in queries], [str(root / d) for d in database], list(gnd)
    )


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


def copy_detection_map(
    query_features: torch.Tensor,
    database_features: torch.Tensor,
    gnd: Sequence[Mapping[str, Sequence[int]]],
) -> float:
    """Copy-detection mAP (percent): cosine ranking, positives ``gnd[q]["ok"]``.

    Args:
        query_features: ``[n_query, D]`` (e.g. Copydays "strong" attacks).
        database_features: ``[n_db, D]`` (the original images).
        gnd: per query ``{"ok": [...], "junk": [...] (optional)}`` database indices.
    """
    if len(gnd) != len(query_features):
        raise ValueError(
            f"gnd must hold one entry per query, got {len(gnd)} for {len(query_features)}"
        )
    mean_ap, *_ = compute_map(rank_database(query_features, database_features), gnd)
    return 100.0 * mean_ap

