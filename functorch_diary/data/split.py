"""``Split``: a dataset already in memory, as train and test tensors."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["Split"]


class Split(NamedTuple):
    """Images (float, N x C x H x W) and integer labels for training and testing."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
