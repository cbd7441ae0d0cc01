"""Gradient clipping as transformations: ``clip_grad_norm_`` and ``clip_grad_value_``, pure.

Put a clipping stage first in a ``chain`` to clip the raw gradients, as the imperative
loop does between ``loss.backward()`` and ``optimizer.step()``.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.chain(optim.clip_by_global_norm(1.0), optim.sgd(lr=1.0))
    >>> params = {"w": torch.zeros(2)}
    >>> updates, _ = opt.update({"w": torch.tensor([3.0, 4.0])}, opt.init(params), params)
    >>> updates["w"]
    tensor([-0.6000, -0.8000])
"""

from __future__ import annotations

import optree
import torch

from ..tree import PyTree
from .base import EmptyState, GradientTransformation
from .shards import global_norm

__all__ = ["clip", "clip_by_global_norm"]


def clip_by_global_norm(max_norm: float) -> GradientTransformation:
    """Scale all updates by ``min(1, max_norm / (norm + 1e-6))``, like
    ``torch.nn.utils.clip_grad_norm_(params, max_norm)`` (L2 norm over all leaves).

    As torch does, the factor is applied even when it is 1: no data-dependent branch, so
    no device sync and no graph break. In the sharded step the norm is over every rank's
    shards (:func:`~functorch_diary.optim.shards.global_norm`), as in one process.

    Args:
        max_norm: the largest global L2 norm let through.

    Returns:
        A stateless transformation.

    Example:
        >>> import torch
        >>> t = clip_by_global_norm(10.0)
        >>> t.update({"w": torch.tensor([3.0, 4.0])}, t.init({}))[0]
        {'w': tensor([3., 4.])}
    """

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None):
        leaves, spec = optree.tree_flatten(updates, none_is_leaf=False)
        if not leaves:
            return updates, state
        total_norm = global_norm(updates)
        factor = torch.clamp(max_norm / (total_norm + 1e-6), max=1.0)
        return optree.tree_unflatten(spec, torch._foreach_mul(leaves, factor)), state

    return GradientTransformation(lambda params: EmptyState(), update)


def clip(max_delta: float) -> GradientTransformation:
    """Clamp every update to ``[-max_delta, max_delta]``, like
    ``torch.nn.utils.clip_grad_value_(params, max_delta)``.

    Args:
        max_delta: the largest absolute value let through.

    Returns:
        A stateless transformation.

    Example:
        >>> import torch
        >>> t = clip(0.5)
        >>> t.update({"w": torch.tensor([-2.0, 0.25, 3.0])}, t.init({}))[0]
        {'w': tensor([-0.5000,  0.2500,  0.5000])}
    """

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None):
        leaves, spec = optree.tree_flatten(updates, none_is_leaf=False)
        if not leaves:
            return updates, state
        clipped = torch._foreach_clamp_min(leaves, -max_delta)
        torch._foreach_clamp_max_(clipped, max_delta)
        return optree.tree_unflatten(spec, clipped), state

    return GradientTransformation(lambda params: EmptyState(), update)
