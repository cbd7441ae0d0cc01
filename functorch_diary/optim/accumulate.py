"""Gradient accumulation over ``k`` micro-batches as a transformation (optax's MultiSteps).

Seed 003 accumulates by *not* calling ``optimizer.zero_grad()`` for ``k`` backward passes,
then stepping once: a batch too large for memory, in ``k`` pieces. Here the sum lives in
the optimiser state. Every call adds the gradients; on every ``k``-th call the inner
optimiser steps with their mean (or sum), otherwise the update is ``-0.0`` (params stay
bit-for-bit) and the inner state is kept.

The choice is made with ``torch.where`` on a step counter, never a Python branch, so a
compiled step is one graph for all micro-steps. The price: the inner update is
computed on every micro-step and discarded on ``k - 1`` of them.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.accumulate_gradients(optim.sgd(lr=1.0), every_k=2)
    >>> params = {"w": torch.zeros(1)}
    >>> state = opt.init(params)
    >>> u, state = opt.update({"w": torch.tensor([1.0])}, state, params)
    >>> u["w"]
    tensor([-0.])
    >>> u, state = opt.update({"w": torch.tensor([3.0])}, state, params)
    >>> u["w"]
    tensor([-2.])
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from ..tree import PyTree, tree_add, tree_leaves, tree_map, tree_scale
from .base import GradientTransformation, updates_where

__all__ = ["AccumulateState", "accumulate_gradients"]


class AccumulateState(NamedTuple):
    """Micro-steps since the last real step, the gradient sum, and the inner state."""

    micro_step: Tensor
    grad_sum: PyTree
    inner: Any


def accumulate_gradients(
    inner: GradientTransformation, every_k: int, *, average: bool = True
) -> GradientTransformation:
    """Step ``inner`` once every ``every_k`` calls, on the accumulated gradients.

    Args:
        inner: the optimiser.
        every_k: micro-batches per step.
        average: pass the mean of the ``k`` gradients (so ``k`` micro-batches of ``b``
            with a mean loss step like one batch of ``k * b``); ``False`` passes their
            sum, like torch's ``.grad`` after ``k`` backward passes.

    Returns:
        A transformation whose state is an :class:`AccumulateState`.
    """
    if every_k < 1:
        raise ValueError(f"every_k must be at least 1, got {every_k}")

    def init(params: PyTree) -> AccumulateState:
        leaves = tree_leaves(params)
        micro = torch.zeros((), dtype=torch.int64, device=leaves[0].device if leaves else None)
        return AccumulateState(micro, tree_map(torch.zeros_like, params), inner.init(params))

    def update(updates: PyTree, state: AccumulateState, params: PyTree | None = None):
        grad_sum = tree_add(state.grad_sum, updates)
        micro = state.micro_step + 1
        emit = micro >= every_k
        grads = tree_scale(grad_sum, 1.0 / every_k) if average else grad_sum
        stepped, new_inner = inner.update(grads, state.inner, params)
        kept_inner = optree.tree_map(
            lambda new, old: torch.where(emit, new, old), new_inner, state.inner, none_is_leaf=False
        )
        reset = tree_map(lambda g: torch.where(emit, 0.0, g), grad_sum)
        return updates_where(emit, stepped), AccumulateState(
            torch.where(emit, 0, micro), reset, kept_inner
        )

    return GradientTransformation(init, update)
