"""Sources: image folders, file lists, arrays, Fashion-MNIST; clear errors on bad paths."""

import gzip

import numpy as np
import pytest
from PIL import Image

import carp_fast.pipelines.scan as scan
import carp_fast.pipelines.sources as sources
from carp_fast.pipelines import ArraySource, FileListSource, ImageFolderSource, load_fashion_mnist


def _write_jpegs(folder, n, size=(40, 32)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(len(str(folder)))
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(folder / f"{i}.jpg")


def test_image_folder_classes_labels_len(tmp_path):
    _write_jpegs(tmp_path / "b_cls", 2)
    _write_jpegs(tmp_path / "a_cls", 3)
    src = ImageFolderSource(tmp_path)
    assert src.classes == ["a_cls", "b_cls"] and src.num_classes == 2
    assert len(src) == 5
    np.testing.assert_array_equal(src.labels, [0, 0, 0, 1, 1])
    assert src.labels.dtype == np.int64


def test_image_folder_missing_path_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ImageFolderSource(tmp_path / "nowhere")


@pytest.mark.parametrize("layout", ["no_class_dirs", "empty_class_dirs"])
def test_image_folder_without_images_is_an_error(tmp_path, layout):
    if layout == "no_class_dirs":
        (tmp_path / "loose.jpg").write_bytes(b"")
    else:
        (tmp_path / "a").mkdir()
        (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match=str(tmp_path)):
        ImageFolderSource(tmp_path)


def test_file_list_text_relative_paths_and_labels(tmp_path):
    _write_jpegs(tmp_path / "imgs", 3)
    (tmp_path / "list.txt").write_text("imgs/0.jpg 4\nimgs/1.jpg 0\n\n# comment\nimgs/2.jpg 2\n")
    src = FileListSource(tmp_path / "list.txt")
    assert len(src) == 3 and src.num_classes == 5
    np.testing.assert_array_equal(src.labels, [4, 0, 2])
    assert src.files[0] == str(tmp_path / "imgs" / "0.jpg")


def test_file_list_python_list_and_unlabelled(tmp_path):
    _write_jpegs(tmp_path, 2)
    src = FileListSource([str(tmp_path / "0.jpg"), (tmp_path / "1.jpg", 1)])
    np.testing.assert_array_equal(src.labels, [-1, 1])


def test_file_list_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="list.txt"):
        FileListSource(tmp_path / "list.txt")
    (tmp_path / "list.txt").write_text("missing.jpg 0\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        FileListSource(tmp_path / "list.txt")
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        FileListSource(tmp_path / "empty.txt")


@pytest.mark.parametrize("channels", [None, 3])
def test_array_source_replicates_grayscale(channels):
    shape = (5, 6, 7) if channels is None else (5, 6, 7, 3)
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    src = ArraySource(images, np.array([0, 1, 2, 1, 0]))
    assert len(src) == 5 and src.num_classes == 3
    batch = src.arrays(np.array([3, 1]))
    assert batch.shape == (2, 6, 7, 3) and batch.dtype == np.uint8
    expected = images[[3, 1]] if channels else np.repeat(images[[3, 1], ..., None], 3, -1)
    np.testing.assert_array_equal(batch, expected)


def test_array_source_validation():
    with pytest.raises(ValueError, match="uint8"):
        ArraySource(np.zeros((2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="shape"):
        ArraySource(np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(ValueError, match="labels"):
        ArraySource(np.zeros((2, 4, 4), np.uint8), np.zeros(3))
    assert (ArraySource(np.zeros((2, 4, 4), np.uint8)).labels == -1).all()


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.tobytes())


def test_fashion_mnist_from_root(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 2], np.uint8)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    src = load_fashion_mnist("test", root=tmp_path)
    assert len(src) == 6 and src.num_classes == 10
    np.testing.assert_array_equal(src.images, images)
    np.testing.assert_array_equal(src.labels, labels)


def test_fashion_mnist_missing_names_all_three_ways(tmp_path, monkeypatch):
    import torchvision.datasets

    def no_network(*args, **kwargs):
        raise RuntimeError("no network")

    monkeypatch.setattr(sources, "FASHION_MNIST_ROOT", str(tmp_path / "not_installed"))
    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", no_network)
    with pytest.raises(FileNotFoundError, match="root=") as err:
        load_fashion_mnist("train", root=tmp_path)
    assert "apt-get install dataset-fashion-mnist" in str(err.value)
    assert "torchvision" in str(err.value) and "network" in str(err.value)
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("val")


@pytest.mark.skipif(not (sources.Path(sources.FASHION_MNIST_ROOT) / "t10k-images-idx3-ubyte.gz").is_file(),
                    reason="Debian dataset-fashion-mnist not installed")
def test_fashion_mnist_debian_install():
    src = load_fashion_mnist("test")
    assert src.images.shape == (10000, 28, 28) and len(src) == 10000
    assert np.bincount(src.labels).tolist() == [1000] * 10


@pytest.mark.filterwarnings("ignore:Skipping 1 unusable")  # subsets holding broken.jpg warn about it
def test_subsets_are_fixed_random_and_read_only_what_they_keep(tmp_path, monkeypatch):
    arrays = ArraySource(np.arange(10 * 4, dtype=np.uint8).reshape(10, 2, 2), np.arange(10))
    a, b = arrays.subset(4, seed=1), arrays.subset(4, seed=1)
    assert len(a) == 4 and np.array_equal(a.labels, b.labels) and list(a.labels) == sorted(a.labels)
    assert arrays.subset(10) is arrays and arrays.subset(99) is arrays
    for cls in ("a", "b"):
        (tmp_path / cls).mkdir()
        for i in range(3):
            Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / cls / f"{i}.jpg")
    (tmp_path / "a" / "broken.jpg").write_bytes(b"")
    scanned, real_check = [], scan.check_file

    def recording_check(path):
        scanned.append(path)
        return real_check(path)

    monkeypatch.setattr(scan, "check_file", recording_check)
    folder = ImageFolderSource(tmp_path)
    first, again = folder.subset(3, seed=0), folder.subset(3, seed=0)
    first.check(), again.check()
    # The subset's files, nothing else, read once: the second subset takes their verdicts from the scan cache.
    assert sorted(scanned) == sorted(first._candidates)
    assert first._candidates == again._candidates and len(first._candidates) == 3  # same seed, same files
    assert folder.subset(3, seed=1)._candidates != first._candidates
    assert first.num_classes == 2 and first.classes == ["a", "b"] and first.root == tmp_path
    # A subset of a scanned source takes its part of the scan: no file is read again.
    with pytest.warns(UserWarning, match="broken.jpg"):
        folder.check()
    scanned.clear()
    held_broken = 0
    for seed in range(4):
        sub = folder.subset(4, seed=seed)
        usable = [f for f in sub._candidates if not f.endswith("broken.jpg")]
        assert sub.files == usable
        held_broken += len(usable) < 4
    assert scanned == [] and held_broken > 0
