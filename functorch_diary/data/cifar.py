"""CIFAR-10 from its standard python-pickle batches on disk; never downloads.

The "CIFAR-10 python version" archive unpacks to ``cifar-10-batches-py/`` holding
``data_batch_1`` .. ``data_batch_5``, ``test_batch`` and ``batches.meta``: pickled dicts
whose ``data`` entry is a (10000, 3072) uint8 array (each row 1024 red, 1024 green, 1024
blue values of a 32x32 image, row-major) and whose ``labels`` entry is a list of ints.

``pickle.load`` on a file can run any code the file names. These files are read with a
restricted unpickler that resolves only numpy's array-rebuilding functions, its scalar
constructor and ``_codecs.encode`` (which Python 3 uses to pickle ``bytes`` at protocol 2):
anything else a file names is refused before it is called.

Example:
    >>> from functorch_diary.data.cifar import load_cifar10
    >>> load_cifar10("/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: CIFAR-10 batches not found in /nonexistent: data_batch_1, ...
"""

from __future__ import annotations

import codecs
import io
import pickle
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor

from .split import Split

__all__ = [
    "CIFAR10_FILES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "Cifar10",
    "cifar10_split",
    "load_cifar10",
    "read_batch",
]

CIFAR10_FILES = (
    *(f"data_batch_{i}" for i in range(1, 6)),
    "test_batch",
    "batches.meta",
)
#: Per-channel mean and standard deviation of the 50000 training images, in [0, 1] units.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def _numpy_core() -> tuple[Any, Any]:
    try:  # numpy >= 2 moved the implementation to numpy._core
        from numpy._core import multiarray, numeric
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray, numeric
    return multiarray, numeric


def _allowed() -> dict[tuple[str, str], Any]:
    multiarray, numeric = _numpy_core()
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): codecs.encode,
    }
    # Files written by numpy 1 name numpy.core, by numpy 2 numpy._core: the same functions.
    for package in ("numpy.core", "numpy._core"):
        allowed[(f"{package}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{package}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{package}.numeric", "_frombuffer")] = numeric._frombuffer  # protocol 5
    return allowed


class _ArrayUnpickler(pickle.Unpickler):
    """Resolves only numpy array reconstruction; refuses every other global."""

    def __init__(self, file: io.BufferedIOBase, path: Path):
        # encoding="bytes" reads the Python 2 strings of the original files as bytes.
        super().__init__(file, encoding="bytes")
        self._path, self._allowed = path, _allowed()

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self._allowed:
            return self._allowed[(module, name)]
        raise pickle.UnpicklingError(
            f"{self._path}: refusing to load {module}.{name}; a CIFAR-10 batch holds only "
            "numpy arrays, lists, numbers and strings"
        )


def _text(key: Any) -> Any:
    return key.decode("latin1") if isinstance(key, bytes) else key


#: What pickle and numpy raise on truncated or corrupted bytes (UnicodeDecodeError is a
#: ValueError).
_DAMAGED = (EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError, OverflowError, RecursionError)  # fmt: skip


def _unpickle(path: Path) -> dict[str, Any]:
    with open(path, "rb") as handle:
        try:
            loaded = _ArrayUnpickler(handle, path).load()
        except pickle.UnpicklingError as error:
            if str(path) in str(error):  # our refusal of a global: already names the file
                raise
            raise pickle.UnpicklingError(f"{path} is not a readable pickle: {error}") from error
        except _DAMAGED as error:
            # Truncated or corrupted bytes surface as any of these, from pickle or numpy.
            raise ValueError(
                f"{path} is truncated or corrupted ({type(error).__name__}: {error})"
            ) from error
    if not isinstance(loaded, dict):
        raise ValueError(f"{path} is not a CIFAR-10 batch: it holds a {type(loaded).__name__}")
    return {_text(k): v for k, v in loaded.items()}


def read_batch(path: str | Path) -> tuple[Tensor, Tensor]:
    """One batch file as ``(images, labels)``.

    Args:
        path: a ``data_batch_*`` or ``test_batch`` file.

    Returns:
        uint8 images (N, 3, 32, 32) and int64 labels (N,).

    Raises:
        ValueError: the file is truncated or corrupted, lacks ``data``/``labels``, or
            their shapes disagree (the message names the file).
        pickle.UnpicklingError: the file names anything but numpy's array rebuilders, or
            is not a pickle at all.
    """
    path = Path(path)
    batch = _unpickle(path)
    if "data" not in batch or "labels" not in batch:
        raise ValueError(f"{path} is not a CIFAR-10 batch: keys {sorted(batch)} lack data/labels")
    try:
        data, labels = np.asarray(batch["data"]), np.asarray(batch["labels"], dtype=np.int64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{path}: data/labels are not arrays of numbers ({error})") from error
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise ValueError(
            f"{path}: data must be uint8 of shape (N, 3072), got {data.dtype} {data.shape}"
        )
    if labels.shape != (data.shape[0],):
        raise ValueError(f"{path}: {data.shape[0]} images but labels of shape {labels.shape}")
    if labels.size and not (labels.min() >= 0 and labels.max() < 10):
        raise ValueError(f"{path}: labels must lie in [0, 9], got {labels.min()}..{labels.max()}")
    images = torch.from_numpy(data.copy()).view(-1, 3, 32, 32)
    return images, torch.from_numpy(labels)


class Cifar10(NamedTuple):
    """CIFAR-10 as stored: uint8 images (N, 3, 32, 32), int64 labels, the class names."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    classes: list[str]


def _root(data_dir: Path) -> Path:
    # Accept the folder holding the files, or the one the archive was unpacked into.
    nested = data_dir / "cifar-10-batches-py"
    return nested if nested.is_dir() else data_dir


def load_cifar10(data_dir: str | Path) -> Cifar10:
    """Read all seven CIFAR-10 files from ``data_dir`` (or its ``cifar-10-batches-py``).

    Returns:
        A :class:`Cifar10`: 50000 training and 10000 test images for the real files.

    Raises:
        FileNotFoundError: naming every missing file and the folder searched.
        ValueError / pickle.UnpicklingError: a file is not a CIFAR-10 batch.
    """
    root = _root(Path(data_dir))
    missing = [name for name in CIFAR10_FILES if not (root / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 batches not found in {root}: {', '.join(missing)}; download "
            "'CIFAR-10 python version' (cifar-10-python.tar.gz) on a machine with network "
            "access, unpack it and pass --data-dir pointing at cifar-10-batches-py"
        )
    train = [read_batch(root / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = read_batch(root / "test_batch")
    meta = _unpickle(root / "batches.meta")
    if "label_names" not in meta:
        raise ValueError(f"{root / 'batches.meta'} lacks label_names")
    classes = [_text(name) for name in meta["label_names"]]
    return Cifar10(
        torch.cat([x for x, _ in train]), torch.cat([y for _, y in train]), x_test, y_test, classes
    )


def cifar10_split(data_dir: str | Path, *, normalize: bool = True) -> Split:
    """CIFAR-10 as a float :class:`Split`, scaled to [0, 1] and optionally standardised.

    Args:
        data_dir: as for :func:`load_cifar10`.
        normalize: subtract :data:`CIFAR10_MEAN` and divide by :data:`CIFAR10_STD`.

    Returns:
        float32 images (N, 3, 32, 32) and int64 labels.
    """
    data = load_cifar10(data_dir)
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)

    def images(x: Tensor) -> Tensor:
        scaled = x.float() / 255.0
        return (scaled - mean) / std if normalize else scaled

    return Split(images(data.x_train), data.y_train, images(data.x_test), data.y_test)
