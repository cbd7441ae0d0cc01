"""Shuffled mini-batches of in-memory tensors, reproducible from (seed, epoch).

Example:
    >>> import torch
    >>> from functorch_diary.data import batches
    >>> x, y = torch.arange(10.0), torch.arange(10)
    >>> [len(b[0]) for b in batches(x, y, 4, seed=0, epoch=0)]
    [4, 4]
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import Tensor

__all__ = ["batches"]


def batches(
    x: Tensor,
    y: Tensor,
    batch_size: int,
    *,
    seed: int = 0,
    epoch: int = 0,
    shuffle: bool = True,
    drop_last: bool = True,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(x_batch, y_batch)`` over one epoch.

    The order depends only on ``(seed, epoch)``, never on global RNG state, so a resumed
    run sees the same batches. ``drop_last`` (default) keeps every batch the same shape,
    which a compiled step needs to avoid re-tracing on the last, smaller batch.
    """
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows but y has {len(y)}")
    if shuffle:
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        order = torch.randperm(len(x), generator=generator).to(x.device)
    else:
        order = torch.arange(len(x), device=x.device)
    stop = len(x) - len(x) % batch_size if drop_last else len(x)
    for start in range(0, stop, batch_size):
        index = order[start : start + batch_size]
        yield x[index], y[index]
