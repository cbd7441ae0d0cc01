"""MNIST from its standard IDX files on disk (plain or gzipped); never downloads.

Example:
    >>> from functorch_diary.data import load_mnist_idx
    >>> load_mnist_idx("/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: MNIST IDX files not found in /nonexistent: train-images-idx3-ubyte[.gz], ...
"""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path

import numpy as np
import torch

from .split import Split

__all__ = ["MNIST_FILES", "load_mnist_idx"]

MNIST_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)
_MAGIC = {1: 0x00000801, 3: 0x00000803}  # IDX magic numbers for 1-D labels and 3-D images


def _find(root: Path, name: str) -> Path | None:
    # Accept the files at the top level or in torchvision's MNIST/raw layout.
    for folder in (root, root / "MNIST" / "raw", root / "raw"):
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.is_file():
                return candidate
    return None


def _read_idx(path: Path, dims: int) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path} is a truncated or corrupted gzip file ({error})") from error
    if len(raw) < 4 + 4 * dims or int.from_bytes(raw[:4], "big") != _MAGIC[dims]:
        raise ValueError(
            f"{path} is not an IDX file with {dims} dimension(s): bad header "
            f"(magic {raw[:4].hex() or 'missing'}, expected {_MAGIC[dims]:08x})"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    # math.prod on Python ints: a forged header's sizes cannot overflow the comparison.
    if body.size != math.prod(shape):
        raise ValueError(
            f"{path} is truncated or corrupted: header says {shape}, found {body.size} bytes "
            "of data"
        )
    return body.reshape(shape)


def load_mnist_idx(data_dir: str | Path) -> Split:
    """Read the four MNIST IDX files from ``data_dir``.

    Returns:
        A :class:`Split` with float32 images in [0, 1], shape (N, 1, 28, 28), int64 labels.

    Raises:
        FileNotFoundError: naming every missing file and the folders searched.
        ValueError: a file has a bad header, is truncated or corrupted, or an images file
            and its labels file disagree on the count (the message names the files).
    """
    root = Path(data_dir)
    found = {name: _find(root, name) for name in MNIST_FILES}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        raise FileNotFoundError(
            f"MNIST IDX files not found in {root}: "
            + ", ".join(f"{name}[.gz]" for name in missing)
            + f" (looked in {root}, {root / 'MNIST' / 'raw'}, {root / 'raw'}); "
            "copy the four files there, or omit --data-dir to use the bundled digits"
        )
    x_train, y_train, x_test, y_test = (
        _read_idx(found[name], 3 if "images" in name else 1) for name in MNIST_FILES
    )
    for images_name, labels_name, x, y in (
        (MNIST_FILES[0], MNIST_FILES[1], x_train, y_train),
        (MNIST_FILES[2], MNIST_FILES[3], x_test, y_test),
    ):
        if len(x) != len(y):
            raise ValueError(
                f"{found[images_name]} holds {len(x)} images but {found[labels_name]} holds "
                f"{len(y)} labels: the two files are from different sets"
            )
        if y.size and y.max() > 9:
            raise ValueError(f"{found[labels_name]}: labels must lie in [0, 9], got {y.max()}")

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Split(images(x_train), labels(y_train), images(x_test), labels(y_test))
