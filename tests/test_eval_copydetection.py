"""Copy detection: the Copydays layout, the prefix rule and AP over the top 20 ranks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from carp_fast.eval.copydetection import copy_detection_map, load_copydays


def _ranked(n_db, order):
    """A query e0 and a database whose cosine ranking is ``order`` (first = most similar)."""
    angles = torch.empty(n_db, dtype=torch.float64)
    angles[torch.tensor(order)] = torch.linspace(0.0, 1.5, n_db, dtype=torch.float64)
    return torch.tensor([[1.0, 0.0]], dtype=torch.float64), torch.stack([angles.cos(), angles.sin()], dim=1)


def test_ap_counts_only_the_top_20_ranks():
    order = list(range(30))
    query, database = _ranked(30, order)
    # Positives 0 (rank 0), 5 (rank 5) and 25 (rank 25, beyond the top 20), 3 in all:
    #   rank 0:  (1 + 1) / 2 * 1/3            = 1/3
    #   rank 5:  (1/5 + 2/6) / 2 * 1/3        = (8/15) / 6 = 4/45
    #   rank 25: not counted (the full ranking would add (2/25 + 3/26) / 2 * 1/3)
    want = 1 / 3 + 4 / 45
    assert copy_detection_map(query, database, [[0, 5, 25]]) == pytest.approx(100 * want)
    full = want + (2 / 25 + 3 / 26) / 6
    assert copy_detection_map(query, database, [[0, 5, 25]], top=30) == pytest.approx(100 * full)
    with pytest.raises(ValueError, match="one entry per query"):
        copy_detection_map(query, database, [])


def _copydays(root, rng, folder=""):
    """Copydays as the official script reads it: original/ and strong/ (names share 4 chars);
    ``folder="copydays_"``: the folder names of the INRIA tarballs."""
    for block in ("original", "strong"):
        (root / f"{folder}{block}").mkdir(parents=True)
    colours = {"2000": (220, 20, 20), "2001": (20, 220, 20), "2002": (20, 20, 220)}
    for prefix, colour in colours.items():
        Image.fromarray(np.full((30, 40, 3), colour, np.uint8)).save(root / f"{folder}original" / f"{prefix}00.jpg")
        for attack in ("01", "02"):
            noisy = np.clip(np.array(colour) + rng.normal(0, 25, (40, 30, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(noisy).save(root / f"{folder}strong" / f"{prefix}{attack}.jpg")
    (root / f"{folder}strong" / "readme.txt").write_text("not an image")


@pytest.mark.parametrize("folder", ["", "copydays_"])
def test_load_copydays(tmp_path, folder):
    _copydays(tmp_path, np.random.default_rng(0), folder)
    days = load_copydays(tmp_path)
    assert days.database[0] == str(tmp_path / f"{folder}original" / "200000.jpg")
    assert [p.rsplit("/", 1)[1] for p in days.queries] == ["200001.jpg", "200002.jpg", "200101.jpg", "200102.jpg",
                                                           "200201.jpg", "200202.jpg"]  # fmt: skip
    assert days.positives == [[0], [0], [1], [1], [2], [2]]
    with pytest.raises(FileNotFoundError, match="has no original/ \(or copydays_original/\) sub-folder"):
        load_copydays(tmp_path / f"{folder}original")


def test_copydetection_cli(tmp_path):
    from carp_fast.eval.cli import main
    from tests.test_eval_cli import _StudentTeacher

    _copydays(tmp_path / "copydays", np.random.default_rng(1))
    torch.manual_seed(0)
    torch.save({"model": _StudentTeacher().state_dict(), "config": {"arch": "resnet18_small"}}, tmp_path / "m.pth")
    out = tmp_path / "cd.json"
    rc = main(["copydetection", "--checkpoint", str(tmp_path / "m.pth"), "--data", str(tmp_path / "copydays"),
               "--imsize", "32", "--no-cache", "--no-progress", "--workers", "0", "--out", str(out)])  # fmt: skip
    assert rc == 0
    record = json.loads(out.read_text())
    assert record["settings"]["imsize"] == 32 and record["settings"]["top"] == 20
    assert record["settings"]["n"] == [6, 3]
    assert record["results"][0]["mAP"] == pytest.approx(100.0)  # flat colours: each finds its original
