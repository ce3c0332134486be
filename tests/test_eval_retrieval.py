"""Retrieval and copy-detection mAP against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from carp_fast.eval.retrieval import (
    compute_ap,
    compute_map,
    copy_detection_map,
    load_ground_truth,
    rank_database,
    retrieval_map,
)

# One query, database of 6 images ranked [2, 0, 4, 1, 3, 5] (column of `ranks`).
RANKING = np.array([[2], [0], [4], [1], [3], [5]])


def test_compute_ap_perfect_and_by_hand():
    # Positives at positions 0 and 1 of 2: each trapezoid (1 + 1) / 2 * 1/2 -> AP 1.
    assert compute_ap([0, 1], 2) == pytest.approx(1.0)
    # Positives at positions 1 and 3:
    #   j=0, rank 1: precision before 0/1, after 1/2 -> (0 + 1/2) / 2 * 1/2 = 3/24
    #   j=1, rank 3: precision before 1/3, after 2/4 -> (1/3 + 1/2) / 2 * 1/2 = 5/24
    assert compute_ap([1, 3], 2) == pytest.approx(8 / 24)
    # One positive of two found at position 0; the other never retrieved: 1/2.
    assert compute_ap([0], 2) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "junk, expected",
    [
        # No junk: positives 0 and 1 sit at positions 1 and 3 -> 8/24 (above).
        ([], 8 / 24),
        # Junk image 2 is first: both positives move up one place, to 0 and 2:
        #   j=0, rank 0: (1 + 1) / 2 * 1/2 = 12/24;  j=1, rank 2: (1/2 + 2/3) / 2 * 1/2 = 7/24
        ([2], 19 / 24),
        # Junk image 4 sits at position 2, between the positives: only the second moves,
        # to position 2:  3/24 + 7/24
        ([4], 10 / 24),
        # Junk after every positive changes nothing.
        ([5], 8 / 24),
    ],
)
def test_compute_map_junk(junk, expected):
    mean_ap, aps, _, _ = compute_map(RANKING, [{"ok": [0, 1], "junk": junk}])
    assert mean_ap == pytest.approx(expected)
    assert aps[0] == pytest.approx(expected)


def test_precision_at_k_follows_revisitop():
    # Positives at 1-based positions 2 and 4. revisitop caps k at the last positive:
    # P@1 = 0/1, P@5 -> k = min(4, 5) = 4 -> 2/4.
    _, _, mpr, prs = compute_map(RANKING, [{"ok": [0, 1]}], kappas=(1, 5))
    np.testing.assert_allclose(prs[0], [0.0, 0.5])
    np.testing.assert_allclose(mpr, [0.0, 0.5])


def test_query_without_positives_is_skipped():
    ranks = np.hstack([RANKING, RANKING])
    mean_ap, aps, _, _ = compute_map(ranks, [{"ok": [0, 1]}, {"ok": []}])
    assert math.isnan(aps[1]) and mean_ap == pytest.approx(8 / 24)
    assert math.isnan(compute_map(RANKING, [{"ok": []}])[0])


def _features_with_ranking(order):
    """A query e0 and a 2-d database whose cosine ranking is `order`."""
    angles = torch.empty(len(order), dtype=torch.float64)
    angles[torch.tensor(order)] = torch.linspace(0.0, 1.0, len(order), dtype=torch.float64)
    database = torch.stack([angles.cos(), angles.sin()], dim=1) * 3.0  # scale is ignored
    return torch.tensor([[1.0, 0.0]], dtype=torch.float64), database


def test_rank_database_is_cosine_order():
    query, database = _features_with_ranking([2, 0, 4, 1, 3, 5])
    np.testing.assert_array_equal(rank_database(query, database), RANKING)


def test_retrieval_map_easy_medium_hard():
    query, database = _features_with_ranking([2, 0, 4, 1, 3, 5])
    # Second query points the other way: ranking reversed, [5, 3, 1, 4, 0, 2].
    queries = torch.cat([query, -query])
    gnd = [
        {"easy": [0], "hard": [1], "junk": [2]},
        {"easy": [5], "hard": [], "junk": []},
    ]
    result = retrieval_map(queries, database, gnd)
    # Query 1, easy: ok [0], junk [2, 1]; 0 at position 1 after one junk -> 0 -> AP 1.
    # Query 1, medium: ok [0, 1], junk [2] -> 19/24 (test_compute_map_junk).
    # Query 1, hard: ok [1], junk [2, 0]; 1 at position 3 after two junk -> 1:
    #   (0/1 + 1/2) / 2 * 1 = 1/4.
    # Query 2: 5 ranked first -> AP 1 for easy and medium; no hard positives -> skipped.
    assert result.map_easy == pytest.approx(100.0)
    assert result.map_medium == pytest.approx(100.0 * (19 / 24 + 1) / 2)
    assert result.map_hard == pytest.approx(25.0)
    assert set(result.mp_at) == {"easy", "medium", "hard"}


def test_copy_detection_map():
    query, database = _features_with_ranking([2, 0, 4, 1, 3, 5])
    assert copy_detection_map(query, database, [{"ok": [0, 1]}]) == pytest.approx(100 * 8 / 24)
    assert copy_detection_map(query, database, [{"ok": [2]}]) == pytest.approx(100.0)
    with pytest.raises(ValueError, match="one entry per query"):
        copy_detection_map(query, database, [])


def test_load_ground_truth(tmp_path):
    spec = {"queries": ["q/a.jpg"], "database": ["db/0.jpg", "db/1.jpg"], "gnd": [{"ok": [1]}]}
    (tmp_path / "gt.json").write_text(json.dumps(spec))
    truth = load_ground_truth(tmp_path / "gt.json")
    assert truth.queries == [str(tmp_path / "q/a.jpg")]
    assert truth.gnd == [{"ok": [1]}]
    spec["gnd"] = [{"ok": [2]}]
    (tmp_path / "bad.json").write_text(json.dumps(spec))
    with pytest.raises(ValueError, match="outside the database"):
        load_ground_truth(tmp_path / "bad.json")
    (tmp_path / "keys.json").write_text(json.dumps({"queries": []}))
    with pytest.raises(ValueError, match="expected keys"):
        load_ground_truth(tmp_path / "keys.json")


def test_rank_database_errors():
    with pytest.raises(ValueError, match="share D"):
        rank_database(torch.zeros(1, 3), torch.zeros(4, 2))
