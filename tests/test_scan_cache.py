"""The pre-flight scan done once: reused on the next launch and by the other rank, redone for
what changed, outside the data, and timed by bench-data."""

import functools
import json
import os
import traceback
import warnings

import numpy as np
import pytest
from PIL import Image

from carp_fast.pipelines import ImageFolderSource, scan
from carp_fast.pipelines.make_jpeg_folder import main as make_main
from carp_fast.pipelines.scan_cache import cache_folder
from tests.conftest import run_ranks


@pytest.fixture()
def folder(tmp_path):
    """Classes a and b, 3 small JPEGs each, and one empty file in a."""
    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "data" / cls / f"{i}.jpg")
    (tmp_path / "data" / "a" / "broken.jpg").write_bytes(b"")
    return tmp_path / "data"


@pytest.fixture()
def checked(monkeypatch):
    """The files the scan reads (checks), in order, for this test."""
    seen, real = [], scan.check_file

    def recording(path):
        seen.append(os.path.basename(path))
        return real(path)

    monkeypatch.setattr(scan, "check_file", recording)
    return seen


def _launch(folder, bad="broken.jpg"):
    """What a launch does: list the folder and scan it (which warns about the bad file)."""
    with pytest.warns(UserWarning, match=bad):
        return ImageFolderSource(folder).check()


def test_the_second_launch_uses_the_cache_and_a_changed_file_is_scanned_again(folder, checked, scan_cache_folder):
    first = _launch(folder)
    assert len(checked) == 7 and len(first) == 6
    assert list(scan_cache_folder.glob("scan/*.npz")) and not list(folder.rglob("*.npz"))  # outside the data
    checked.clear()
    second = _launch(folder)
    assert checked == [] and second.files == first.files and second.bad_files == first.bad_files
    # One image rewritten (new contents, new time), one broken file fixed, one file added.
    Image.new("RGB", (9, 9), (1, 2, 3)).save(folder / "b" / "1.jpg")
    os.utime(folder / "b" / "1.jpg", ns=(1, 1))
    Image.new("RGB", (8, 8)).save(folder / "a" / "broken.jpg")
    Image.new("RGB", (8, 8)).save(folder / "b" / "new.jpg")
    third = ImageFolderSource(folder).check()
    assert sorted(checked) == ["1.jpg", "broken.jpg", "new.jpg"] and len(third) == 8 and third.bad_files == []
    checked.clear()
    (folder / "a" / "0.jpg").write_bytes(b"")  # a good image broken since: found, not trusted from the cache
    fourth = _launch(folder, bad="0.jpg")
    assert checked == ["0.jpg"] and len(fourth) == 7


def test_a_subset_reuses_the_whole_folders_scan(folder, checked):
    _launch(folder)
    checked.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the subset may hold the broken file
        sub = ImageFolderSource(folder).subset(3, seed=0).check()
    assert checked == [] and len(sub) <= 3


def test_off_and_unwritable_cache(folder, checked, monkeypatch, tmp_path):
    monkeypatch.setenv("CARP_FAST_CACHE", "off")
    assert cache_folder() is None
    _launch(folder), _launch(folder)
    assert len(checked) == 14  # no cache: every launch scans
    blocked = tmp_path / "file"
    blocked.write_text("a file where the cache folder would be")
    monkeypatch.setenv("CARP_FAST_CACHE", str(blocked / "cache"))
    with pytest.warns(UserWarning, match="not writable"):
        assert len(_launch(folder)) == 6  # the scan still serves this launch


def _rank_worker(rank, port, queue, data):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import torch.distributed as dist

        seen, real = [], scan.check_file
        scan.check_file = lambda path: (seen.append(path), real(path))[1]
        dist.init_process_group("gloo", rank=rank, world_size=2)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            source = ImageFolderSource(data).check()
        dist.destroy_process_group()
        queue.put((rank, dict(checked=len(seen), files=source.files, bad=source.bad_files)))
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()}))


def test_rank_0_scans_while_the_other_waits_and_reuses(folder):
    results = run_ranks(functools.partial(_rank_worker, data=str(folder)), 2, timeout=300)
    assert all("error" not in r for r in results.values()), results
    assert results[0]["checked"] == 7 and results[1]["checked"] == 0
    assert results[0]["files"] == results[1]["files"] and results[0]["bad"] == results[1]["bad"]


def test_bench_data_reports_scan_and_startup_times(tmp_path, capsys):
    from carp_fast.pipelines import bench
    from carp_fast.pipelines.make_shards import make_shards

    make_main([str(tmp_path / "jpegs"), "--classes", "2", "--per-class", "4"])
    make_shards(tmp_path / "jpegs", tmp_path / "shards", shard_size=3)
    for data in (tmp_path / "jpegs", tmp_path / "shards" / "train"):
        capsys.readouterr()
        bench.main(["--data", str(data), "--backend", "dali", "--batch-size", "2", "--workers", "1",
                    "--seconds", "0.3", "--warmup", "1", "--global-size", "32", "--local-size", "16"])
        result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert result["num_images"] == 8 and result["images_per_s"] > 0
        assert 0 <= result["scan_s"] < result["startup_s"]
        assert np.isclose(result["startup_s"], result["scan_s"] + result["results"][0]["first_batch_s"]
                          if "results" in result else result["scan_s"] + result["first_batch_s"], atol=1e-2)


def _failing_worker(rank, port, queue, data):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import torch.distributed as dist

        from carp_fast.pipelines import ShardSource

        dist.init_process_group("gloo", rank=rank, world_size=2)
        try:
            ShardSource(data)
            outcome = "opened"
        except Exception as error:  # noqa: BLE001 - the test compares what each rank raised
            outcome = f"{type(error).__name__}: {error}"
        dist.destroy_process_group()
        queue.put((rank, outcome))
    except Exception:
        queue.put((rank, traceback.format_exc()))


def test_an_error_on_rank_0_is_raised_on_every_rank_not_waited_for(tmp_path):
    import io
    import tarfile

    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        for name, data in (("k.jpg", b"\xff\xd8"), ("k.cls", b"seven")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    results = run_ranks(functools.partial(_failing_worker, data=str(tmp_path)), 2, timeout=300)
    assert results[0].startswith("ValueError") and "not an integer label" in results[0]
    assert results[1].startswith("RuntimeError") and "rank 0" in results[1]


def test_the_listing_is_rglobs_without_a_stat_per_file(tmp_path):
    """`_list_files` gives what the former `sorted(rglob)` listing gave: the same files in the same order."""
    from pathlib import Path

    from carp_fast.pipelines.sources import _list_files

    root = tmp_path / "cls"
    for folder in ("sub/.hidden", "b.c"):
        (root / folder).mkdir(parents=True)
    for name in ("1.jpg", "10.jpg", "2.jpg", ".x", "sub/z.jpg", "sub/.hidden/q.jpg", "b.c/y.jpg", "b.jpg"):
        (root / name).write_bytes(b"")
    (root / "link.jpg").symlink_to(root / "1.jpg")
    (root / "dirlink").symlink_to(root / "sub")
    (root / "broken.jpg").symlink_to(root / "nowhere")
    os.mkfifo(root / "fifo")
    former = [str(p) for p in sorted(p for p in Path(root).rglob("*") if p.is_file() and not p.name.startswith("."))]
    assert _list_files(str(root)) == former
    assert [os.path.relpath(p, root) for p in former][3:5] == ["b.c/y.jpg", "b.jpg"]  # parts compared in turn
