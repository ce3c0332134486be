"""Retrieval and copy-detection mAP against values worked out by hand."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from carp_fast.eval.retrieval import (
    MultiScale,
    compute_ap,
    compute_map,
    load_ground_truth,
    load_revisitop,
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


def _revisitop(root, rng):
    """revisitop's layout: roxford5k/gnd_roxford5k.pkl and roxford5k/jpg/<name>.jpg."""
    import pickle

    from PIL import Image

    folder = root / "roxford5k"
    (folder / "jpg").mkdir(parents=True)
    imlist = [f"all_souls_{i:06d}" for i in range(5)]
    qimlist = ["all_souls_query", "radcliffe_query"]
    for name, (h, w) in zip(imlist + qimlist, [(30, 40), (40, 30), (20, 20), (36, 24), (25, 50), (32, 48), (48, 20)]):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(folder / "jpg" / f"{name}.jpg")
    gnd = [
        {"bbx": [1.0, 2.0, 10.0, 12.0], "easy": np.array([0, 3]), "hard": np.array([1]), "junk": [2]},
        {"bbx": [0.0, 0.0, 5.0, 5.0], "easy": np.array([4], dtype=np.int64), "hard": np.array([], dtype=np.int64), "junk": []},
    ]
    with open(folder / "gnd_roxford5k.pkl", "wb") as f:
        pickle.dump({"imlist": imlist, "qimlist": qimlist, "gnd": gnd}, f)
    return folder


def test_load_revisitop_pickle_as_distributed(tmp_path):
    folder = _revisitop(tmp_path, np.random.default_rng(0))
    for given in (folder / "gnd_roxford5k.pkl", folder):
        truth = load_ground_truth(given)
        assert truth.queries == [str(folder / "jpg" / "all_souls_query.jpg"), str(folder / "jpg" / "radcliffe_query.jpg")]
        assert truth.database[4] == str(folder / "jpg" / "all_souls_000004.jpg")
        assert truth.gnd[0] == {"easy": [0, 3], "hard": [1], "junk": [2]}
        assert truth.gnd[1] == {"easy": [4], "hard": [], "junk": []}
    (folder / "jpg" / "all_souls_000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 listed image"):
        load_revisitop(folder)


def test_revisitop_pickle_may_not_run_code(tmp_path):
    import os
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("true",))

    (tmp_path / "jpg").mkdir()
    with open(tmp_path / "gnd_x.pkl", "wb") as f:
        pickle.dump({"imlist": [], "qimlist": [], "gnd": [Evil()]}, f)
    with pytest.raises(pickle.UnpicklingError, match="only lists, dicts and numpy arrays"):
        load_revisitop(tmp_path / "gnd_x.pkl")


class _Pool(torch.nn.Module):
    """A size-dependent 'backbone': a conv then global average pooling, [N, 3, H, W] -> [N, 4]."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 4, 3, stride=2)

    def forward(self, x):
        return torch.relu(self.conv(x)).mean(dim=(2, 3))


def test_multiscale_features_of_a_non_square_image(tmp_path):
    from PIL import Image

    from carp_fast.eval.data import thumbnail_batches
    from carp_fast.eval.features import extract_features

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 255, (300, 700, 3), dtype=np.uint8)  # H 300, W 700
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    model = _Pool()
    got = extract_features(MultiScale(model), thumbnail_batches([str(tmp_path / "wide.png")], imsize=512, workers=0),
                           device="cpu", progress=False).features  # fmt: skip

    # Reference: PIL thumbnail to longer side 512 (aspect kept: 512 x 219), ImageNet
    # normalisation, the three scales of DINO's multi_scale, mean, L2 normalisation.
    image = Image.fromarray(pixels)
    image.thumbnail((512, 512), Image.Resampling.LANCZOS)
    assert image.size == (512, 219)
    x = torch.tensor(np.asarray(image), dtype=torch.float32).permute(2, 0, 1)[None] / 255.0
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        feats = [model(x)]
        for s in (1 / 2**0.5, 0.5):
            feats.append(model(torch.nn.functional.interpolate(x, scale_factor=s, mode="bilinear", align_corners=False)))
    want = torch.stack(feats).mean(0)
    want = want / want.norm()
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # One scale is a different feature: the test can tell the scales apart.
    single = model(x).detach()
    assert not torch.allclose(got, single / single.norm(), atol=1e-3)


def test_retrieval_cli_on_revisitop_layout(tmp_path):
    from carp_fast.eval.cli import main
    from tests.test_eval_cli import _StudentTeacher

    folder = _revisitop(tmp_path, np.random.default_rng(2))
    torch.manual_seed(0)
    torch.save({"model": _StudentTeacher().state_dict(), "config": {"arch": "resnet18_small"}}, tmp_path / "m.pth")
    out = tmp_path / "r.json"
    rc = main(["retrieval", "--checkpoint", str(tmp_path / "m.pth"), "--ground-truth", str(folder / "gnd_roxford5k.pkl"),
               "--imsize", "32", "--no-cache", "--no-progress", "--workers", "0", "--out", str(out)])  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    settings = record["settings"]
    assert settings["variant"] == "paper" and settings["multiscale"] and len(settings["scales"]) == 3
    assert settings["n"] == [2, 5]
    assert 0.0 <= record["results"][0]["mAP_medium"] <= 100.0
