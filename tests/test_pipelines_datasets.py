"""open_split: the data sets training and evaluation name with --data."""

import numpy as np
import pytest
from PIL import Image

from carp_fast.pipelines import ArraySource, ImageFolderSource, open_split


def _class_folders(root, classes=("a", "b"), per_class=2):
    for name in classes:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")


def test_imagenet_layout_train_and_val(tmp_path):
    _class_folders(tmp_path / "train")
    _class_folders(tmp_path / "val", per_class=1)
    train, test = open_split(tmp_path, "train"), open_split(tmp_path, "test")
    assert isinstance(train, ImageFolderSource) and len(train) == 4
    assert len(test) == 2 and all("/val/" in f for f in test.files)


def test_test_folder_is_used_when_there_is_no_val(tmp_path):
    _class_folders(tmp_path / "train")
    _class_folders(tmp_path / "test", per_class=1)
    assert all("/test/" in f for f in open_split(tmp_path, "test").files)


def test_class_folders_alone_are_a_training_split(tmp_path):
    _class_folders(tmp_path)
    assert len(open_split(tmp_path, "train")) == 4
    assert open_split(tmp_path, "test", required=False) is None
    with pytest.raises(FileNotFoundError, match="no val/ or test/ folder"):
        open_split(tmp_path, "test")


def test_bad_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such folder"):
        open_split(tmp_path / "missing", "train")
    with pytest.raises(ValueError, match="split must be one of"):
        open_split(tmp_path, "validation")


def test_fashion_mnist_by_name(tmp_path):
    # idx files written here, so the test does not depend on the Debian package.
    import gzip

    def idx(path, array):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
        with gzip.open(path, "wb") as f:
            f.write(header + array.astype(np.uint8).tobytes())

    idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((5, 28, 28)))
    idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(5))
    source = open_split("fashion-mnist", "test", root=tmp_path)
    assert isinstance(source, ArraySource) and len(source) == 5
