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
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4 + 4 * dims or int.from_bytes(raw[:4], "big") != _MAGIC[dims]:
        raise ValueError(f"{path} is not an IDX file with {dims} dimension(s) (bad header)")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    body = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * dims)
    if body.size != int(np.prod(shape)):
        raise ValueError(
            f"{path} is truncated: header says {shape}, found {body.size} bytes of data"
        )
    return body.reshape(shape)


def load_mnist_idx(data_dir: str | Path) -> Split:
    """Read the four MNIST IDX files from ``data_dir``.

    Returns:
        A :class:`Split` with float32 images in [0, 1], shape (N, 1, 28, 28), int64 labels.

    Raises:
        FileNotFoundError: naming every missing file and the folders searched.
        ValueError: a file has a bad header or is truncated.
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

    def images(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255.0).unsqueeze(1)

    def labels(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.int64))

    return Split(images(x_train), labels(y_train), images(x_test), labels(y_test))
