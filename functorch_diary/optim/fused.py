"""The eager fused steps of Adam(W), RMSprop and Adagrad: ``torch.optim``'s multi-tensor
kernels, op for op and scalar for scalar, run tile by tile into fresh outputs.

``torch.optim`` updates params and state in place, pass after pass over whole tensors. A
pure step cannot: it writes new params and new state, so it touches about twice the
memory, and on a CPU each pass then streams it from further out in the cache hierarchy
(on a 2-core Xeon, ``torch.mul(x, c, out=y)`` over 9 MB costs 2.5x ``x.mul_(c)``). Running
all of a step's passes on one tile (``TILE`` elements of every tensor) before moving to the
next keeps the tile's temporaries (Adam's denominator) cached instead, which brought the
pure Adam and AdamW steps from about 1.5x to 1.04-1.22x the time of ``torch.optim``'s
in-place ones, depending on how busy the machine's memory is
(``benchmarks/optimizer_update.py``). Each element sees the same kernels in the same order
as in torch, so the results are torch's to the bit.

The callers (the ``update_and_apply`` of :func:`~functorch_diary.optim.scale_by_adam`,
:func:`~functorch_diary.optim.scale_by_rms` and :func:`~functorch_diary.optim.scale_by_rss`)
check first that in-place writes are allowed (:mod:`.fast_path`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

__all__ = ["TILE", "adagrad", "adam", "rmsprop", "runs_on", "tiles"]

#: Elements per tile (4 MB of float32 per tensor): the fastest of 2**16..2**21 in
#: benchmarks/optimizer_update.py on a 2-core Xeon; smaller tiles pay more per-call
#: Python overhead than they save.
TILE = 1 << 20


def runs_on(leaves: Sequence[Tensor]) -> bool:
    """Whether the tiled steps are the fast path for these leaves: on the CPU. On a GPU
    one multi-tensor ``foreach`` launch per pass beats a launch per tile and op.

    Example:
        >>> import torch
        >>> runs_on([torch.ones(1)]), runs_on([torch.ones(1, device="meta")]), runs_on([])
        (True, False, False)
    """
    return bool(leaves) and leaves[0].device.type == "cpu"


def tiles(*leaf_lists: Sequence[Tensor], size: int | None = None) -> Iterator[tuple[Tensor, ...]]:
    """Matching pieces of the i-th leaf of every list: whole leaves, except that leaves
    of more than ``size`` (default :data:`TILE`) elements, contiguous in every list, come
    as 1-D slices.

    Example:
        >>> import torch
        >>> leaves = [torch.ones(5), torch.ones(2, 2), torch.ones(2, 3).t()]
        >>> [tuple(t.shape) for t, _ in tiles(leaves, leaves, size=2)]
        [(2,), (2,), (1,), (2,), (2,), (3, 2)]
    """
    size = TILE if size is None else size
    for leaves in zip(*leaf_lists, strict=True):
        n = leaves[0].numel()
        if n <= size or not all(t.is_contiguous() for t in leaves):
            yield leaves
            continue
        flat = [t.view(-1) for t in leaves]
        for start in range(0, n, size):
            yield tuple(f[start : start + size] for f in flat)


def _empty_like(leaves: Sequence[Tensor]) -> list[Tensor]:
    return [torch.empty_like(t) for t in leaves]


class _Scratch:
    """One reusable buffer for a step's large per-tile temporaries: the same memory for
    every tile, so it stays in cache (a fresh allocation per tile would not)."""

    #: Below this many elements a temporary is cache-resident anyway, and a fresh one is
    #: cheaper to make than a view of the buffer.
    SMALL = 1 << 16

    def __init__(self, leaves: Sequence[Tensor]) -> None:
        size = min(TILE, max((t.numel() for t in leaves), default=0))
        like = leaves[0] if leaves else torch.empty(0)
        self.buffer = torch.empty(size, dtype=like.dtype, device=like.device)

    def like(self, tile: Tensor) -> Tensor:
        """Uninitialised memory shaped like ``tile``."""
        if tile.numel() < self.SMALL:
            return torch.empty_like(tile)
        return self.buffer[: tile.numel()].view(tile.shape)


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    mu: list[Tensor],
    nu: list[Tensor],
    nu_max: list[Tensor] | None,
    *,
    b1: float,
    b2: float,
    eps: float,
    lr: float,
    step: int,
    weight_decay: float = 0.0,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor] | None]:
    """One step of ``torch.optim.Adam`` (``AdamW`` with ``weight_decay``), ``foreach=True``.

    Args:
        params, grads, mu, nu: leaf lists (``exp_avg``, ``exp_avg_sq``).
        nu_max: AMSGrad's ``max_exp_avg_sq``, or ``None`` without AMSGrad.
        b1, b2, eps, lr: torch's hyperparameters.
        step: the step being taken (1 on the first).
        weight_decay: AdamW's decoupled decay (0: Adam).

    Returns:
        New ``params``, ``mu``, ``nu`` and ``nu_max``; the inputs are not modified.

    Example:
        >>> import torch
        >>> p, m, v, _ = adam([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)],
        ...     [torch.zeros(2)], None, b1=0.9, b2=0.999, eps=1e-8, lr=0.1, step=1)
        >>> p[0]
        tensor([0.9000, 0.9000])
    """
    step_size = (lr / (1 - b1**step)) * -1
    bc2_sqrt = (1 - b2**step) ** 0.5
    new_params, new_mu, new_nu = _empty_like(params), _empty_like(mu), _empty_like(nu)
    amsgrad = [nu_max, _empty_like(nu_max)] if nu_max is not None else []
    columns = [params, grads, mu, nu, new_params, new_mu, new_nu, *amsgrad]
    scratch = _Scratch(params)
    for p, g, m, v, p_out, m_out, v_out, *maxes in tiles(*columns):
        torch.lerp(m, g, 1 - b1, out=m_out)
        torch.mul(v, b2, out=v_out)
        v_out.addcmul_(g, g, value=1 - b2)
        if maxes:
            v_max, v_max_out = maxes
            torch.maximum(v_max, v_out, out=v_max_out)
        denom = torch.sqrt(maxes[1] if maxes else v_out, out=scratch.like(p))
        denom.div_(bc2_sqrt).add_(eps)
        if weight_decay:
            torch.mul(p, 1 - lr * weight_decay, out=p_out)
            p_out.addcdiv_(m_out, denom, value=step_size)
        else:
            torch.addcdiv(p, m_out, denom, value=step_size, out=p_out)
    return new_params, new_mu, new_nu, amsgrad[1] if amsgrad else None


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avg: list[Tensor],
    grad_avg: list[Tensor] | None,
    *,
    alpha: float,
    eps: float,
    lr: float,
) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
    """One step of ``torch.optim.RMSprop`` without momentum, ``foreach=True``.

    Args:
        params, grads, square_avg: leaf lists.
        grad_avg: the centered variant's running mean of gradients, or ``None``.
        alpha, eps, lr: torch's hyperparameters.

    Returns:
        New ``params``, ``square_avg`` and ``grad_avg``; the inputs are not modified.

    Example:
        >>> import torch
        >>> p, _, _ = rmsprop([torch.ones(1)], [torch.ones(1)], [torch.zeros(1)], None,
        ...     alpha=0.75, eps=0.0, lr=0.5)
        >>> p[0]
        tensor([0.])
    """
    new_params, new_square_avg = _empty_like(params), _empty_like(square_avg)
    centered = [grad_avg, _empty_like(grad_avg)] if grad_avg is not None else []
    columns = [params, grads, square_avg, new_params, new_square_avg, *centered]
    scratch = _Scratch(params)
    for p, g, v, p_out, v_out, *means in tiles(*columns):
        torch.mul(v, alpha, out=v_out)
        v_out.addcmul_(g, g, value=1 - alpha)
        avg = scratch.like(p)
        if means:
            mean, mean_out = means
            torch.lerp(mean, g, 1 - alpha, out=mean_out)
            torch.addcmul(v_out, mean_out, mean_out, value=-1, out=avg)
            avg.sqrt_()
        else:
            torch.sqrt(v_out, out=avg)
        avg.add_(eps)
        torch.addcdiv(p, g, avg, value=-lr, out=p_out)
    return new_params, new_square_avg, centered[1] if centered else None


def adagrad(
    params: list[Tensor], grads: list[Tensor], sums: list[Tensor], *, eps: float, lr: float
) -> tuple[list[Tensor], list[Tensor]]:
    """One step of ``torch.optim.Adagrad``, ``foreach=True``.

    Args:
        params, grads, sums: leaf lists (``sums`` is torch's ``sum``).
        eps: torch's eps.
        lr: the decayed learning rate of this step (torch's ``clr``).

    Returns:
        New ``params`` and ``sums``; the inputs are not modified.

    Example:
        >>> import torch
        >>> p, s = adagrad([torch.ones(1)], [torch.full((1,), 3.0)], [torch.zeros(1)],
        ...     eps=0.0, lr=0.5)
        >>> p[0], s[0]
        (tensor([0.5000]), tensor([9.]))
    """
    new_params, new_sums = _empty_like(params), _empty_like(sums)
    std_scratch, numerator_scratch = _Scratch(params), _Scratch(params)
    for p, g, s, p_out, s_out in tiles(params, grads, sums, new_params, new_sums):
        torch.addcmul(s, g, g, value=1, out=s_out)
        std = torch.sqrt(s_out, out=std_scratch.like(p))
        std.add_(eps)
        numerator = torch.mul(g, -lr, out=numerator_scratch.like(p))
        torch.addcdiv(p, numerator, std, out=p_out)
    return new_params, new_sums
