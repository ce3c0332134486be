"""Bad input: broken files skipped with one warning (or one strict error), odd formats converted."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from carp_fast.pipelines import ImageFolderSource, MultiCropConfig, eval_loader, pretrain_loader
from carp_fast.pipelines.make_jpeg_folder import natural_image

CROPS = MultiCropConfig(global_size=24, local_size=12, local_crops=1)
BROKEN = ["truncated.jpg", "zero.jpg", "notes.jpg"]


@pytest.fixture()
def messy(tmp_path):
    """Class a: 2 good RGB JPEGs, grayscale JPEG, CMYK JPEG, RGBA PNG and 3 broken files;
    class b: 3 good JPEGs; class c: empty. 8 usable images."""
    rng = np.random.default_rng(0)
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b, tmp_path / "c"):
        folder.mkdir()
    for i in range(2):
        Image.fromarray(natural_image(rng, 40, 48)).save(a / f"good{i}.jpg")
    for i in range(3):
        Image.fromarray(natural_image(rng, 40, 48)).save(b / f"good{i}.jpg")
    rgb = Image.fromarray(natural_image(rng, 40, 48))
    rgb.convert("L").save(a / "gray.jpg")
    rgb.convert("CMYK").save(a / "cmyk.jpg")
    rgb.convert("RGBA").save(a / "rgba.png")
    data = (a / "good0.jpg").read_bytes()
    (a / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (a / "zero.jpg").write_bytes(b"")
    (a / "notes.jpg").write_text("not an image\n")
    return tmp_path


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_good_images_used_broken_skipped_with_one_warning(messy, backend):
    with pytest.warns(UserWarning) as record:
        loader = eval_loader(ImageFolderSource(messy), size=24, resize=32, batch_size=3, backend=backend)
    ours = [w for w in record if "unusable" in str(w.message)]
    assert len(ours) == 1
    message = str(ours[0].message)
    assert "3 unusable file(s)" in message and all(name in message for name in BROKEN)
    assert "empty file" in message and "not a readable image" in message
    assert "c" in message.split("without images:")[1]  # the empty class folder is named
    images = torch.cat([x for x, _ in loader])
    labels = torch.cat([y for _, y in loader])
    assert images.shape == (8, 3, 24, 24) and torch.isfinite(images).all()
    assert labels.tolist() == [0] * 5 + [1] * 3
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same source warns once, not per loader
        train = pretrain_loader(loader.source, CROPS, batch_size=4, backend=backend)
    assert sum(len(b[-1]) for b in train) == 8


def test_converted_images_match_pil_rgb(messy):
    src = ImageFolderSource(messy)
    with pytest.warns(UserWarning):
        files = src.files
    images = torch.cat([x for x, _ in eval_loader(src, size=40, resize=None, batch_size=8, backend="dali")])
    mean = torch.tensor(CROPS.mean).view(3, 1, 1)
    std = torch.tensor(CROPS.std).view(3, 1, 1)
    for name in ("cmyk.jpg", "gray.jpg", "rgba.png"):
        i = [f.split("/")[-1] for f in files].index(name)
        pil = torch.from_numpy(np.array(Image.open(files[i]).convert("RGB"))).permute(2, 0, 1)[:, :, 4:44]
        torch.testing.assert_close(images[i], (pil / 255 - mean) / std, rtol=0, atol=1e-5)


def test_strict_raises_one_clear_error_before_training(messy):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # strict: an error, not a warning first
        with pytest.raises(ValueError, match="3 unusable file") as err:
            pretrain_loader(ImageFolderSource(messy), CROPS, batch_size=2, backend="dali", strict=True)
    assert all(name in str(err.value) for name in BROKEN) and "strict=False" in str(err.value)


def test_all_broken_is_an_error(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.jpg").write_bytes(b"")
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="no usable images"):
        eval_loader(ImageFolderSource(tmp_path), size=8, batch_size=2)


def test_missing_path_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing_dir"):
        pretrain_loader(str(tmp_path / "missing_dir"), CROPS, batch_size=2)


def test_decoder_failure_names_the_files(messy, monkeypatch):
    """A file that passes the scan but fails in DALI: the error names it, no hang."""
    src = ImageFolderSource(messy)
    with pytest.warns(UserWarning):
        src.check()
    good = src.encoded
    monkeypatch.setattr(src, "encoded", lambda i: np.frombuffer(b"garbage!", np.uint8) if i == 1 else good(i))
    loader = eval_loader(src, size=24, resize=32, batch_size=4, backend="dali")
    with pytest.raises(RuntimeError, match="gray.jpg"):
        list(loader)


@pytest.mark.parametrize("said,kind", [
    ("Critical error in pipeline:\nError in MIXED operator `nvidia.dali.fn.decoders.image`\nCUDA allocation failed\n"
     "Current pipeline object is no longer valid.", "out of memory"),
    ("Critical error in pipeline:\nCUDA runtime error (700): cudaErrorIllegalAddress", "a CUDA error")])
def test_a_dali_out_of_memory_or_cuda_error_is_not_blamed_on_the_images(messy, monkeypatch, said, kind):
    """DALI's own failure at the pipeline-run boundary: its own message, with the batch and crop sizes."""
    from nvidia.dali.pipeline import Pipeline

    from carp_fast.pipelines.dali_loader import DaliDeviceError

    def failing(self, *args, **kwargs):
        raise RuntimeError(said)

    monkeypatch.setattr(Pipeline, "share_outputs", failing)
    with pytest.warns(UserWarning):
        train = pretrain_loader(ImageFolderSource(messy), CROPS, batch_size=4, backend="dali", workers=1)
    with pytest.raises(DaliDeviceError, match=f"DALI (ran|hit) {kind} at batch 0 of epoch 0 on cpu "
                                              r"\(batch_size=4 per process, crops 2x24\+1x12, 1 DALI threads\); "
                                              "not a broken image") as error:
        list(train)
    assert "good0.jpg" not in str(error.value) and said.splitlines()[-1] in str(error.value)
    evaluation = eval_loader(train.source, size=24, resize=32, batch_size=3, backend="dali", workers=1)
    with pytest.raises(DaliDeviceError, match=r"batch_size=3 per process, crops 24 from 32"):
        list(evaluation)


@pytest.mark.parametrize("backend", ["dali", "torchvision"])
def test_an_image_deleted_after_the_scan_is_skipped_with_one_warning(messy, backend):
    """Deleted between the pre-flight scan and its batch: the next image of its class stands in
    (the epoch keeps its length, every other image its place), named in one warning, not an error."""
    src = ImageFolderSource(messy)
    with pytest.warns(UserWarning):
        src.check()
    deleted = messy / "b" / "good1.jpg"
    i = src.files.index(str(deleted))
    deleted.unlink()
    loader = eval_loader(src, size=24, resize=32, batch_size=3, backend=backend, workers=0 if backend == "torchvision" else 1)
    with pytest.warns(UserWarning) as record:
        epochs = [torch.cat([x for x, _ in loader]) for _ in range(2)]
    ours = [str(w.message) for w in record if "good1.jpg" in str(w.message)]
    assert len(ours) == 1, ours  # once, not once an epoch
    assert "unreadable since the pre-flight scan" in ours[0] and f"{messy / 'b' / 'good2.jpg'} stands in" in ours[0]
    for images in epochs:
        assert images.shape == (8, 3, 24, 24) and torch.equal(images[i], images[i + 1])
    assert len(list(pretrain_loader(src, CROPS, batch_size=4, backend=backend))) == 2  # the same for training


def test_an_image_deleted_after_a_strict_scan_is_an_error_naming_it(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    for i in range(2):
        Image.fromarray(natural_image(rng, 40, 48)).save(tmp_path / "a" / f"good{i}.jpg")
    src = ImageFolderSource(tmp_path).check(strict=True)
    (tmp_path / "a" / "good0.jpg").unlink()
    with pytest.raises(OSError, match="good0.jpg: unreadable since the pre-flight scan"):
        src.encoded(0)


def test_a_jpeg_corrupt_in_the_middle_is_named(tmp_path):
    """libjpeg prints "Corrupt JPEG data" to stderr with no file name; the torchvision path names
    the file (the scan reads headers and ends only, so it keeps such a file)."""
    import io

    rng = np.random.default_rng(0)
    (tmp_path / "a").mkdir()
    buf = io.BytesIO()
    Image.fromarray(natural_image(rng, 64, 80)).save(buf, format="JPEG", quality=90)
    data = bytearray(buf.getvalue())
    middle = (data.find(b"\xff\xda") + len(data)) // 2
    for k in range(middle, middle + 40, 2):  # bogus restart markers inside the entropy-coded data
        data[k], data[k + 1] = 0xFF, 0xD0 + k % 8
    (tmp_path / "a" / "damaged.jpg").write_bytes(bytes(data))
    Image.fromarray(natural_image(rng, 64, 80)).save(tmp_path / "a" / "fine.jpg")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        images = torch.cat([x for x, _ in eval_loader(ImageFolderSource(tmp_path), size=24, resize=32, batch_size=2,
                                                       backend="torchvision", workers=0)])
    named = [str(w.message) for w in record if "Corrupt JPEG data" in str(w.message)]
    assert images.shape == (2, 3, 24, 24)
    assert len(named) == 1 and named[0].startswith(f"{tmp_path / 'a' / 'damaged.jpg'}: Corrupt JPEG data")
