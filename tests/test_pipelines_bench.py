"""Benchmark CLI and JPEG folder generator (tiny runs: this checks the contract, not speed)."""

import json

import numpy as np
from PIL import Image

from carp_fast.pipelines import bench
from carp_fast.pipelines.make_jpeg_folder import main as make_main


def test_make_jpeg_folder_is_natural_looking(tmp_path, capsys):
    make_main([str(tmp_path / "jpegs"), "--classes", "2", "--per-class", "2"])
    files = sorted((tmp_path / "jpegs").rglob("*.JPEG"))
    assert len(files) == 4 and {f.parent.name for f in files} == {"class_000", "class_001"}
    image = np.asarray(Image.open(files[0]), dtype=np.float32)
    assert image.shape == (350, 400, 3)
    assert 50_000 < files[0].stat().st_size < 200_000  # photo-like size, about 100 KB
    # Not white noise: neighbouring pixels are strongly correlated.
    a, b = image[:, :-1].ravel(), image[:, 1:].ravel()
    assert np.corrcoef(a, b)[0, 1] > 0.8


def test_bench_prints_json_last(tmp_path, capsys):
    make_main([str(tmp_path / "jpegs"), "--classes", "2", "--per-class", "4"])
    capsys.readouterr()
    bench.main(["--data", str(tmp_path / "jpegs"), "--backend", "both", "--batch-size", "2", "--workers", "1",
                "--seconds", "0.5", "--warmup", "1", "--global-size", "64", "--local-size", "32"])
    last = capsys.readouterr().out.strip().splitlines()[-1]
    result = json.loads(last)
    assert result["backend"] == "dali" and [r["backend"] for r in result["results"]] == ["dali", "torchvision"]
    for r in result["results"]:
        assert r["images_per_s"] > 0 and abs(r["crops_per_s"] - 8 * r["images_per_s"]) < 1  # 2 + 6 crops
