"""Data: bundled digits, MNIST IDX files written by the test, reproducible batches."""


import numpy as np
import pytest
import torch

from functorch_diary.data import MNIST_FILES, batches, load_digits, load_mnist_idx
from tests.helpers import write_idx, write_mnist


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_idx_round_trip(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz=gz)
    split = load_mnist_idx(tmp_path)
    assert split.x_train.shape == (20, 1, 28, 28) and split.x_test.shape == (10, 1, 28, 28)
    expected = torch.from_numpy(
        arrays["train-images-idx3-ubyte"].astype(np.float32) / 255
    ).unsqueeze(1)
    assert torch.equal(split.x_train, expected)
    assert torch.equal(
        split.y_test, torch.from_numpy(arrays["t10k-labels-idx1-ubyte"].astype(np.int64))
    )


def test_mnist_missing_files_are_named(tmp_path):
    write_mnist(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\]") as info:
        load_mnist_idx(tmp_path)
    assert "train-images" not in str(info.value)


def test_mnist_bad_header_and_truncation_are_clear(tmp_path):
    write_mnist(tmp_path)
    labels = tmp_path / "train-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes()[:-3])
    with pytest.raises(ValueError, match="truncated"):
        load_mnist_idx(tmp_path)
    labels.write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 20)
    with pytest.raises(ValueError, match="bad header"):
        load_mnist_idx(tmp_path)


def test_mnist_forged_sizes_and_bad_labels_are_clear(tmp_path):
    write_mnist(tmp_path)
    images = tmp_path / "train-images-idx3-ubyte"
    # Sizes whose product overflows int64: compared exactly, so reported as a mismatch.
    images.write_bytes(b"\x00\x00\x08\x03" + b"\xff\xff\xff\xff" * 3 + b"\x00" * 64)
    with pytest.raises(ValueError, match=r"truncated or corrupted: header says \(4294967295"):
        load_mnist_idx(tmp_path)
    write_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(10, 12, np.uint8))
    with pytest.raises(ValueError, match=r"t10k-labels-idx1-ubyte: labels must lie in \[0, 9\]"):
        load_mnist_idx(tmp_path)


def test_mnist_truncated_gzip_names_the_file(tmp_path):
    write_mnist(tmp_path, gz=True)
    path = tmp_path / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:12])
    with pytest.raises(ValueError, match=r"idx1-ubyte\.gz is a truncated or corrupted gzip"):
        load_mnist_idx(tmp_path)


def test_digits_are_real_and_split_reproducibly():
    a, b = load_digits(seed=0), load_digits(seed=0)
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert len(a.y_train) + len(a.y_test) == 1797
    assert set(a.y_train.tolist()) == set(range(10))
    assert float(a.x_train.min()) >= 0.0 and float(a.x_train.max()) <= 1.0
    small = load_digits(size=8)
    assert small.x_train.shape[-2:] == (8, 8)


def test_batches_depend_only_on_seed_and_epoch():
    x, y = torch.arange(10.0), torch.arange(10)
    first = [b[1].tolist() for b in batches(x, y, 3, seed=1, epoch=2)]
    torch.manual_seed(123)  # global RNG state must not matter
    assert first == [b[1].tolist() for b in batches(x, y, 3, seed=1, epoch=2)]
    assert first != [b[1].tolist() for b in batches(x, y, 3, seed=1, epoch=3)]
    assert len(first) == 3 and sorted([label for batch in first for label in batch]) != list(
        range(10)
    )  # last partial batch dropped
    everything = [b[1].tolist() for b in batches(x, y, 3, shuffle=False, drop_last=False)]
    assert [label for batch in everything for label in batch] == list(range(10))


def test_mnist_files_constant_names_the_standard_files():
    assert MNIST_FILES[0] == "train-images-idx3-ubyte"
