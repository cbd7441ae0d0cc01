"""Data-parallel training on ``torch.distributed``: one process per device, same update.

Each rank computes the gradients of its shard of the global batch; the gradient pytree
is averaged over the ranks with one ``all_reduce`` per dtype (the leaves are packed into
one flat buffer, so a ResNet costs one collective, not one per tensor); every rank then
applies the same update to the same params, so the ranks stay identical without ever
sending weights. With equal shards this is the single-process step on the whole batch:
the mean of the shards' mean losses is the mean loss.

- gloo on CPU, NCCL on GPU (``cuda:LOCAL_RANK``), picked by :func:`init_from_env`.
- Floating model state (BatchNorm running statistics) is averaged too, so the ranks'
  states stay equal; integer state (``num_batches_tracked``) is the same everywhere.
- Dropout masks differ per rank (the key is folded with the rank), as each shard holds
  different samples.
- A rank that dies makes the others fail: the process group has a timeout, and a failed
  collective raises :class:`DistributedError` naming the rank that died (each rank joined
  with :func:`init_from_env` keeps a heartbeat in the job's store:
  :mod:`~functorch_diary.training.liveness`), instead of hanging.

Launch the digits demo on 2 CPU processes::

    torchrun --standalone --nproc-per-node 2 -m functorch_diary.cli.distributed --steps 100

Example (one process, no process group: the collectives are skipped):
    >>> import torch
    >>> from functorch_diary.training import distributed
    >>> distributed.all_reduce_mean({"w": torch.ones(2)})
    {'w': tensor([1., 1.])}
    >>> distributed.shard(torch.arange(6), rank=1, world_size=2)
    tensor([3, 4, 5])
"""

from __future__ import annotations

import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
from torch import Tensor

from .. import prng
from ..model.core import Model
from ..optim.base import GradientTransformation
from ..tree import PyTree, tree_leaves, tree_map, tree_unflatten_like
from . import liveness
from .step import Batch, LossFn, TrainState, build_step, step_key

__all__ = [
    "DistributedError",
    "WorldInfo",
    "all_reduce_mean",
    "assert_in_sync",
    "broadcast",
    "collective_failure",
    "init_from_env",
    "make_data_parallel_train_step",
    "shard",
]


class DistributedError(RuntimeError):
    """A collective failed: another rank died, hung past the timeout, or disagrees. The
    message names the rank that died when the ranks joined with :func:`init_from_env`."""


class WorldInfo(NamedTuple):
    """Where this process sits: its rank, the number of ranks, and its device."""

    rank: int
    world_size: int
    device: torch.device


def _active() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank_and_size(group: Any = None) -> tuple[int, int]:
    if not _active():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def init_from_env(backend: str | None = None, timeout_s: float = 120.0) -> WorldInfo:
    """Join the process group described by torchrun's environment variables.

    Args:
        backend: ``"gloo"`` or ``"nccl"``; default NCCL when CUDA is available, else gloo.
        timeout_s: how long a collective waits for the other ranks before failing (a rank
            that hangs makes the others fail within about this time; one that dies, as
            soon as its connections close, plus the 2 s it takes to tell which it was).

    Returns:
        This rank's :class:`WorldInfo`; on NCCL its device is ``cuda:LOCAL_RANK``.

    Raises:
        DistributedError: the variables torchrun sets (``RANK``, ``WORLD_SIZE``,
            ``MASTER_ADDR``, ``MASTER_PORT``) are missing.
    """
    missing = [
        v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ
    ]
    if missing:
        raise DistributedError(
            f"environment variables {missing} are not set; start the script with "
            "torchrun --nproc-per-node N (or set them for every process)"
        )
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cpu")
    if backend == "nccl":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    world = WorldInfo(dist.get_rank(), dist.get_world_size(), device)
    liveness.start(world.rank, world.world_size)
    return world


def collective_failure(what: str, exc: BaseException, *, state: str = "") -> DistributedError:
    """The :class:`DistributedError` for ``exc``, raised by a collective that failed on
    this rank: it names this rank, the rank(s) that stopped (read from the heartbeats,
    up to 2 s after the failure) and ``exc``'s first line. ``state`` says what is left
    as it was (e.g. the last good checkpoint).

    Example (no heartbeat in this process: the rank cannot be named):
        >>> error = collective_failure("all-reduce", RuntimeError("Connection closed by peer"))
        >>> str(error).startswith("rank 0 of 1: all-reduce failed: another rank has probably")
        True
    """
    rank, size = _rank_and_size()
    beat = liveness.current()
    if beat is None:
        who = (
            "another rank has probably died, or is stuck past the process group's timeout "
            "(join with training.distributed.init_from_env to have the rank named)"
        )
    else:
        beat.mark_failed()
        who = beat.who_stopped()
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return DistributedError(
        f"rank {rank} of {size}: {what} failed: {who}{'; ' + state if state else ''}. Look "
        f"at the other ranks' output for the first error; every rank must run the same "
        f"steps in the same order. ({type(exc).__name__}: {first})"
    )


def _collective(what: str, fn: Callable[[], Any]) -> None:
    try:
        fn()
    except Exception as exc:  # gloo and NCCL raise several types for a lost peer
        raise collective_failure(what, exc) from exc


def _packed(tree: PyTree, what: str, op: Callable[[Tensor], None]) -> PyTree:
    """Run ``op`` in place on one flat buffer per (dtype, device) of the leaves; unpack."""
    leaves = tree_leaves(tree)
    groups: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for index, leaf in enumerate(leaves):
        groups.setdefault((leaf.dtype, leaf.device), []).append(index)
    out: list[Tensor] = list(leaves)
    for indices in groups.values():
        buffer = torch.cat([leaves[i].reshape(-1) for i in indices])  # a fresh copy: ours
        _collective(what, lambda buffer=buffer: op(buffer))
        for i, piece in zip(
            indices, buffer.split([leaves[i].numel() for i in indices]), strict=True
        ):
            out[i] = piece.view_as(leaves[i])
    return tree_unflatten_like(tree, out)


def all_reduce_mean(tree: PyTree, group: Any = None, *, what: str = "all-reduce") -> PyTree:
    """The mean over all ranks of every leaf of ``tree``, as new tensors.

    One ``all_reduce`` per (dtype, device) of the leaves. Without a process group (one
    process), returns copies of the leaves. The input is not modified.

    Raises:
        TypeError: a leaf is not floating (its mean would not be an integer).
        DistributedError: the collective failed (a rank died or timed out).
    """
    integer = [leaf.dtype for leaf in tree_leaves(tree) if not leaf.is_floating_point()]
    if integer:
        raise TypeError(
            f"all_reduce_mean averages floating tensors; the tree has {integer[0]} leaves"
        )
    _, size = _rank_and_size(group)
    if size == 1:
        return tree_map(lambda t: t.clone(), tree)

    def reduce(buffer: Tensor) -> None:
        dist.all_reduce(buffer, op=dist.ReduceOp.SUM, group=group)
        buffer.div_(size)

    return _packed(tree, what, reduce)


def broadcast(tree: PyTree, src: int = 0, group: Any = None) -> PyTree:
    """Rank ``src``'s ``tree`` on every rank (e.g. to start from the same params)."""
    if _rank_and_size(group)[1] == 1:
        return tree_map(lambda t: t.clone(), tree)
    return _packed(tree, "broadcast", lambda b: dist.broadcast(b, src=src, group=group))


def assert_in_sync(tree: PyTree, group: Any = None) -> None:
    """Raise :class:`DistributedError` unless every rank holds exactly the same ``tree``."""
    reference = broadcast(tree, src=0, group=group)
    mismatch = [
        torch.ne(a, b).any().reshape(1).to(torch.int32)
        for a, b in zip(tree_leaves(tree), tree_leaves(reference), strict=True)
    ]
    if not mismatch:
        return
    count = torch.cat(mismatch).sum()
    if _rank_and_size(group)[1] > 1:
        _collective("sync check", lambda: dist.all_reduce(count, group=group))
    if int(count) > 0:
        raise DistributedError(f"the ranks hold different values ({int(count)} leaf mismatches)")


def shard(batch: PyTree, rank: int, world_size: int) -> PyTree:
    """Rank ``rank``'s contiguous slice of every leaf of ``batch`` along dim 0.

    Raises:
        ValueError: the batch size is not a multiple of ``world_size`` (unequal shards
            would weight the ranks' samples differently from the whole batch).
    """

    def cut(leaf: Tensor) -> Tensor:
        if leaf.shape[0] % world_size:
            raise ValueError(
                f"batch of {leaf.shape[0]} does not split evenly over {world_size} ranks; use a "
                f"global batch size divisible by {world_size}"
            )
        size = leaf.shape[0] // world_size
        return leaf[rank * size : (rank + 1) * size]

    return tree_map(cut, batch)


def make_data_parallel_train_step(
    model: Model, loss_fn: LossFn, optimizer: GradientTransformation, *, group: Any = None
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Tensor]]]:
    """``make_train_step`` over ranks: ``step(ts, local_batch) -> (ts, {"loss": ...})``.

    ``local_batch`` is this rank's shard (:func:`shard`). Gradients and floating model
    state are averaged over the ranks before the update; ``"loss"`` is the mean over the
    ranks, i.e. the whole batch's loss. Runs eagerly (the collectives run between the
    backward pass and the update).

    Raises:
        DistributedError: a collective failed (a rank died or timed out).
    """

    def key_of(ts: TrainState) -> Tensor:
        return prng.fold_in(step_key(ts), _rank_and_size(group)[0])

    def reduce(grads: PyTree, loss: Tensor, new_state: PyTree):
        floating = {k: v for k, v in new_state.items() if v.is_floating_point()}
        grads, loss, floating = all_reduce_mean(
            (grads, loss.detach(), floating), group, what="all-reduce of the gradients"
        )
        return grads, loss, {k: floating.get(k, v) for k, v in new_state.items()}

    return build_step(model, loss_fn, optimizer, key_of=key_of, reduce=reduce)
