"""Optimiser stages that look past one leaf's elements, run on one rank's shards.

The sharded train step (:mod:`functorch_diary.training.sharded`) runs the optimiser on
each rank's local pieces of the params, gradients and optimiser state: every stage that
acts element by element (SGD, Adam, schedules, masks...) is then unchanged. A stage that
reduces over leaves or over a whole leaf would see only this rank's piece. While the step
runs its optimiser it enters :func:`local_shards`, and those stages ask here:

- :func:`global_norm` (``clip_by_global_norm``): the L2 norm over every rank's pieces,
  one all-reduce of the local sum of squares (a replicated leaf counted once);
- :func:`all_ranks` (``apply_if_finite``): a flag true on every rank, so that all ranks
  skip (or apply) the same step;
- :func:`require_whole` (``muon``, ``adafactor``): a stage that needs a whole leaf (an
  orthogonalised matrix, a factored second moment, a leaf's RMS) refuses a split one,
  naming the leaf and what to place it as.

Outside :func:`local_shards` each is its single-process self.

Example:
    >>> import torch
    >>> tree = {"w": torch.tensor([3.0, 4.0])}
    >>> global_norm(tree)
    tensor(5.)
    >>> with local_shards({"w": "Shard(0)"}, lambda t: 2 * t):  # two equal pieces
    ...     float(global_norm(tree)) == float(torch.tensor(50.0).sqrt())
    True
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, tree_flatten_with_paths, tree_global_norm

__all__ = ["LocalShards", "active", "all_ranks", "global_norm", "local_shards", "require_whole"]


class LocalShards(NamedTuple):
    """What the running optimiser's leaves are: ``split`` maps the path of each param cut
    across ranks to its placement (as text, for messages); ``sum_over_ranks`` sums a
    tensor over the ranks (an all-reduce)."""

    split: Mapping[str, str]
    sum_over_ranks: Callable[[Tensor], Tensor]


_ACTIVE: list[LocalShards] = []


@contextlib.contextmanager
def local_shards(
    split: Mapping[str, str], sum_over_ranks: Callable[[Tensor], Tensor]
) -> Iterator[LocalShards]:
    """Within this context the optimiser's leaves are one rank's pieces (see the module)."""
    _ACTIVE.append(LocalShards(dict(split), sum_over_ranks))
    try:
        yield _ACTIVE[-1]
    finally:
        _ACTIVE.pop()


def active() -> LocalShards | None:
    """The innermost :func:`local_shards`, or ``None`` in a single process."""
    return _ACTIVE[-1] if _ACTIVE else None


def global_norm(tree: PyTree) -> Tensor:
    """The L2 norm of all leaves of ``tree`` together, over every rank's pieces.

    In a single process this is :func:`~functorch_diary.tree.tree_global_norm`. On shards,
    the squares of the split leaves are summed over the ranks (one all-reduce); a leaf
    every rank holds whole is counted once.
    """
    shards = active()
    if shards is None:
        return tree_global_norm(tree)
    entries = tree_flatten_with_paths(tree)
    if not entries:
        return torch.tensor(0.0)
    norms = torch._foreach_norm([leaf for _, leaf in entries])
    split = [shards.split.get(path) is not None for path, _ in entries]
    squares = torch.stack(norms).square()
    mask = torch.tensor(split, device=squares.device)
    ours = torch.where(mask, squares, 0).sum()
    whole = torch.where(mask, 0, squares).sum()
    return (shards.sum_over_ranks(ours) + whole).sqrt()


def all_ranks(flag: Tensor) -> Tensor:
    """``flag`` (a 0-dim bool) and-ed over the ranks; itself in a single process."""
    shards = active()
    if shards is None:
        return flag
    failed = shards.sum_over_ranks((~flag).to(torch.float32))
    return failed == 0


def require_whole(tree: PyTree, optimiser: str, needs: str) -> None:
    """Refuse a split leaf of ``tree``: ``optimiser`` ``needs`` the whole leaf.

    Raises:
        ValueError: on shards, a leaf of ``tree`` is split across ranks; the message names
            the leaf, its placement and how to keep it whole.
    """
    shards = active()
    if shards is None:
        return
    for path, _ in tree_flatten_with_paths(tree):
        placement = shards.split.get(path)
        if placement is not None:
            raise ValueError(
                f"{optimiser} {needs}, but param {path!r} is split across ranks "
                f"({placement}); keep it whole on every rank: "
                f"shard_train_state(..., placements={{{path!r}: Replicate()}})"
            )
