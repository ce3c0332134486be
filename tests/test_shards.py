"""Tar shards: the converter, and the same images, labels, epoch orders and resume as the folder."""

import io
import json
import os
import tarfile
import traceback

import numpy as np
import pytest
import torch
from PIL import Image

from carp_fast.pipelines import (ImageFolderSource, MultiCropConfig, ShardSource, eval_loader, open_split,
                                 pretrain_loader)
from carp_fast.pipelines.make_jpeg_folder import natural_image
from carp_fast.pipelines.make_shards import make_shards
from carp_fast.pipelines.sharding import pretrain_order
from tests.conftest import run_ranks

CROPS = MultiCropConfig(global_crops=2, global_size=24, local_crops=1, local_size=12)
BROKEN = ["truncated.jpg", "zero.jpg", "notes.jpg"]


def _make_folder(root):
    """train/: classes a (4 JPEGs, a CMYK JPEG, 3 broken files), b (5 JPEGs), c (empty): 10 usable;
    val/: a and b with 2 JPEGs each."""
    rng = np.random.default_rng(0)
    for split, counts in (("train", {"a": 4, "b": 5, "c": 0}), ("val", {"a": 2, "b": 2})):
        for cls, n in counts.items():
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(natural_image(rng, 40, 48)).save(root / split / cls / f"img.{i}.jpg")
    a = root / "train" / "a"
    Image.fromarray(natural_image(rng, 40, 48)).convert("CMYK").save(a / "cmyk.jpg")
    data = (a / "img.0.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (a / "zero.jpg").write_bytes(b"")
    (a / "notes.jpg").write_text("not an image\n")
    return root


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """(source folder, shard folder) with shards of 3 images."""
    base = tmp_path_factory.mktemp("shards")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CARP_FAST_CACHE", str(base / "cache"))
        src = _make_folder(base / "src")
        summary = make_shards(src, base / "dst", shard_size=3)
    assert summary["train"]["images"] == 10 and summary["train"]["written"] == 4  # 3 + 3 + 3 + 1
    return src, base / "dst"


def _batches(loader):
    return [tuple(t.clone() for t in b) for b in loader]


def _assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        for x, y in zip(a, b):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_converter_leaves_out_bad_files_and_keeps_classes(converted, capsys):
    src, dst = converted
    assert sorted(p.name for p in (dst / "train").iterdir()) == [
        "000000.tar", "000001.tar", "000002.tar", "000003.tar", "bad_files.txt", "classes.txt", "make_shards.json"]
    listed = (dst / "train" / "bad_files.txt").read_text().splitlines()
    assert sorted(os.path.basename(line.split("\t")[0]) for line in listed) == sorted(BROKEN)
    assert "empty file" in "\n".join(listed)
    assert (dst / "train" / "classes.txt").read_text().split() == ["a", "b", "c"]  # the empty class keeps its index
    with tarfile.open(dst / "train" / "000000.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["00000000_cmyk.png", "00000000_cmyk.cls"]  # converted to RGB PNG; dots out of keys
    assert names[2] == "00000001_img_0.jpg"
    assert json.loads((dst / "val" / "make_shards.json").read_text())["images"] == 4


def test_converter_command_lists_the_bad_files(tmp_path, capsys):
    from carp_fast.cli import main

    src = _make_folder(tmp_path / "src")
    main(["make-shards", str(src), str(tmp_path / "dst"), "--shard-size", "100"])
    out = capsys.readouterr().out
    assert "train: 10 images of 3 classes in 1 shards" in out and "val: 4 images" in out
    assert "left out 3 unusable file(s)" in out and all(name in out for name in BROKEN)
    with pytest.raises(SystemExit) as stop:
        main(["make-shards", str(src), str(tmp_path / "dst"), "--shard-size", "0"])
    assert stop.value.code == 2


def test_converter_resumes_and_refuses_another_source(converted, tmp_path):
    src, dst = converted
    before = {p.name: p.read_bytes() for p in (dst / "train").glob("*.tar")}
    (dst / "train" / "000002.tar").unlink()  # stopped while writing shard 2: its temporary file is left
    (dst / "train" / ".000002.tar.tmp").write_bytes(b"half a shard")
    summary = make_shards(src, dst, shard_size=3)
    assert (summary["train"]["written"], summary["train"]["skipped"]) == (1, 3)
    assert {p.name: p.read_bytes() for p in (dst / "train").glob("*.tar")} == before  # the same bytes again
    assert not (dst / "train" / ".000002.tar.tmp").exists()
    with pytest.raises(ValueError, match="another conversion"):
        make_shards(src, dst, shard_size=4)


def test_shards_hold_the_folders_images_labels_and_order(converted):
    src, dst = converted
    with pytest.warns(UserWarning, match="3 unusable"):
        folder = open_split(src, "train").check()
    shards = open_split(dst, "train")
    assert isinstance(shards, ShardSource) and isinstance(folder, ImageFolderSource)
    assert len(shards) == len(folder) == 10 and shards.classes == folder.classes and shards.num_classes == 3
    np.testing.assert_array_equal(shards.labels, folder.labels)
    for i in range(len(folder)):  # the same bytes: a converted image is the same RGB PNG
        assert shards.encoded(i).tobytes() == folder.encoded(i).tobytes()
    assert shards.name(0).endswith("000000.tar:00000000_cmyk.png")
    assert isinstance(open_split(dst, "test"), ShardSource) and len(open_split(dst, "test")) == 4
    sub = shards.subset(4, seed=3)
    assert len(sub) == 4 and sub.encoded(0).tobytes() == shards.encoded(int(np.flatnonzero(
        [shards.name(i) == sub.name(0) for i in range(10)])[0])).tobytes()


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_same_batches_per_rank_and_exact_mid_epoch_resume(converted, backend):
    src, dst = converted
    with pytest.warns(UserWarning):
        folder = ImageFolderSource(src / "train").check()
    shards = ShardSource(dst / "train")
    kw = dict(batch_size=2, backend=backend, seed=5, num_shards=2, workers=1)
    for rank in range(2):
        from_folder = pretrain_loader(folder, CROPS, shard_id=rank, **kw)
        from_shards = pretrain_loader(shards, CROPS, shard_id=rank, **kw)
        for epoch in range(2):
            a, b = _batches(from_folder), _batches(from_shards)
            _assert_same(a, b)  # the same crops of the same images, in the same order
            order = pretrain_order(10, batch_size=2, seed=5, epoch=epoch, shard_id=rank, num_shards=2)
            np.testing.assert_array_equal(torch.cat([x[-1] for x in b]).numpy(), shards.labels[order])
        resumed = pretrain_loader(shards, CROPS, shard_id=rank, **kw)
        resumed.set_epoch(1, start_batch=1)  # mid-epoch: batch 1 of epoch 1 on
        _assert_same(_batches(resumed), b[1:])
    ev_folder = eval_loader(folder, size=24, resize=32, batch_size=3, backend=backend, workers=1)
    ev_shards = eval_loader(shards, size=24, resize=32, batch_size=3, backend=backend, workers=1)
    _assert_same(_batches(ev_folder), _batches(ev_shards))


def _rank_worker(rank, port, queue, src, dst):
    try:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        import warnings

        import torch.distributed as dist

        dist.init_process_group("gloo", rank=rank, world_size=2)
        shards = ShardSource(os.path.join(dst, "train"))  # rank 0 indexes, rank 1 waits and reuses
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folder = ImageFolderSource(os.path.join(src, "train")).check()
        kw = dict(batch_size=2, backend="dali", seed=9, shard_id=rank, num_shards=2, workers=1)
        a = _batches(pretrain_loader(folder, CROPS, **kw))
        b = _batches(pretrain_loader(shards, CROPS, **kw))
        same = len(a) == len(b) and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
        dist.destroy_process_group()
        queue.put((rank, dict(same=same, labels=torch.cat([x[-1] for x in b]).numpy(),
                              views=torch.stack([x[0].sum() for x in b]).numpy())))
    except Exception:
        queue.put((rank, {"error": traceback.format_exc()}))


def test_two_processes_read_the_folders_batches_from_shards(converted):
    import functools

    src, dst = converted
    results = run_ranks(functools.partial(_rank_worker, src=str(src), dst=str(dst)), 2, timeout=300)
    for rank, result in results.items():
        assert "error" not in result, result.get("error")
        assert result["same"], f"rank {rank}: shards gave other batches than the folder"
        order = pretrain_order(10, batch_size=2, seed=9, epoch=0, shard_id=rank, num_shards=2)
        np.testing.assert_array_equal(result["labels"], ShardSource(dst / "train").labels[order])
    assert not np.array_equal(results[0]["views"], results[1]["views"])  # different images and crops per rank


def test_a_folder_without_tar_files_or_samples_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="holds no .tar files"):
        ShardSource(tmp_path)
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        tar.add(__file__, arcname="readme.txt")
    with pytest.raises(ValueError, match="hold no image members"):
        ShardSource(tmp_path)


def test_the_index_is_kept_and_rebuilt_when_a_shard_changes(converted, tmp_path, monkeypatch):
    import shutil

    from carp_fast.pipelines import shards as shards_module

    _, dst = converted
    copy = shutil.copytree(dst / "train", tmp_path / "train")
    indexed, real = [], shards_module.index_tar
    monkeypatch.setattr(shards_module, "index_tar",
                        lambda path: (indexed.append(os.path.basename(path)), real(path))[1])
    first = ShardSource(copy)
    assert len(first) == 10 and sorted(indexed) == ["000000.tar", "000001.tar", "000002.tar", "000003.tar"]
    indexed.clear()
    assert len(ShardSource(copy)) == 10 and indexed == []  # the second launch reads no tar header
    data = first.encoded(0).tobytes()
    with tarfile.open(copy / "000003.tar", "a") as tar:  # one more sample in the last shard
        for name, payload in (("extra.png", data), ("extra.cls", b"2")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    again = ShardSource(copy)
    assert len(again) == 11 and again.labels[-1] == 2 and again.encoded(10).tobytes() == data
    assert sorted(indexed) == ["000000.tar", "000001.tar", "000002.tar", "000003.tar"]  # rebuilt
