"""Real handwritten digits with no download: scikit-learn's bundled 8x8 digits.

1797 images of 10 digits ship inside scikit-learn itself. They are upsampled to the
28x28 MNIST geometry so LeNet-5 (``16*4*4`` features) runs unchanged.

Example:
    >>> from functorch_diary.data import load_digits
    >>> split = load_digits()
    >>> tuple(split.x_train.shape), tuple(split.x_test.shape), split.x_train.max().item()
    ((1438, 1, 28, 28), (359, 1, 28, 28), 1.0)
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.nn import functional as F

from .split import Split

__all__ = ["digits_batch", "load_digits"]


def load_digits(size: int = 28, test_fraction: float = 0.2, seed: int = 0) -> Split:
    """The scikit-learn digits as a shuffled train/test :class:`Split`.

    Args:
        size: side of the square images (bilinear upsampling from 8x8; 8 keeps them as is).
        test_fraction: share of images held out for testing.
        seed: the shuffle before splitting (the same seed gives the same split).

    Returns:
        A :class:`Split` with float32 images in [0, 1], shape (N, 1, size, size), and int64
        labels.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    bunch = sklearn_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    if size != images.shape[-1]:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        images = images.clamp(0.0, 1.0)
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    n_test = round(len(labels) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    return Split(images[train], labels[train], images[test], labels[test])


def digits_batch(
    step: int, batch_size: int, seed: int = 0, dtype: torch.dtype = torch.float32
) -> tuple[Tensor, Tensor]:
    """Global batch ``step`` of scikit-learn's handwritten digits (64 features, 10 classes).

    The same on every rank (drawn from a generator seeded by ``seed`` and ``step``), so
    each rank takes its :func:`shard` of it. The demo's data; no download.
    """
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    x = torch.as_tensor(digits.data, dtype=dtype) / 16.0
    y = torch.as_tensor(digits.target, dtype=torch.int64)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    index = torch.randint(0, x.shape[0], (batch_size,), generator=generator)
    return x[index], y[index]
