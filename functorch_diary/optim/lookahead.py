"""Lookahead ("k steps forward, 1 step back", Zhang et al. 2019) with optax's semantics.

The paper's loop: ``sync_period`` steps of a fast optimiser, then the slow weights move
``slow_step_size`` of the way toward the fast ones and the fast weights jump to them.
As in ``optax.lookahead`` those two loops are one update per call: on the synchronising
call the update takes the fast params straight to the new slow params. Unlike optax
(which carries ``LookaheadParams(fast, slow)`` as the params), the slow params live in
the optimiser state, so the params stay the plain dict every step and model takes:
:func:`~functorch_diary.make_train_step` and :func:`apply_gradients` run it unchanged.
Evaluate with :func:`slow_params` (they generalise better, says the paper).

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.lookahead(optim.sgd(0.5), sync_period=2, slow_step_size=0.5)
    >>> params = {"w": torch.tensor([4.0])}
    >>> state = opt.init(params)
    >>> for _ in range(2):
    ...     params, state = optim.apply_gradients(opt, {"w": torch.tensor([2.0])}, state, params)
    >>> params["w"], optim.slow_params(state)["w"]
    (tensor([3.]), tensor([3.]))
"""

from __future__ import annotations

from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from ..tree import Params, PyTree, tree_leaves, tree_map, tree_where
from .base import GradientTransformation

__all__ = ["LookaheadState", "lookahead", "slow_params"]


class LookaheadState(NamedTuple):
    """The fast optimiser's state, the fast steps since the last synchronisation, and the
    slow params (optax's ``LookaheadParams.slow``)."""

    fast_state: Any
    steps_since_sync: Tensor
    slow: Params


def slow_params(state: LookaheadState) -> Params:
    """The slow params of a :func:`lookahead` state (the ones to evaluate)."""
    return state.slow


def lookahead(
    fast_optimizer: GradientTransformation,
    sync_period: int,
    slow_step_size: float,
    reset_state: bool = False,
) -> GradientTransformation:
    """``optax.lookahead(fast_optimizer, sync_period, slow_step_size, reset_state)``.

    Args:
        fast_optimizer: the inner optimiser (any transformation).
        sync_period: fast steps per synchronisation (``k``), at least 1.
        slow_step_size: how far the slow params move toward the fast ones (``alpha``).
        reset_state: re-initialise the fast optimiser's state at every synchronisation.

    Returns:
        A transformation whose state is a :class:`LookaheadState`; ``init(params)`` starts
        the slow params as a copy of ``params`` (optax's ``init_synced``). ``update``
        needs ``params`` (the fast ones), and its updates must be applied unchanged, or
        fast and slow params fall out of step (as in optax).

    Raises:
        ValueError: ``sync_period`` below 1.
    """
    if sync_period < 1:
        raise ValueError(f"lookahead: sync_period must be at least 1, got {sync_period}")

    def init(params: PyTree) -> LookaheadState:
        leaves = tree_leaves(params)
        steps = torch.zeros((), dtype=torch.int64, device=leaves[0].device if leaves else None)
        slow = tree_map(lambda p: p.detach().clone(), params)
        return LookaheadState(fast_optimizer.init(params), steps, slow)

    def update(updates: PyTree, state: LookaheadState, params: PyTree | None = None):
        if params is None:
            raise ValueError("lookahead needs the fast params: call update(grads, state, params)")
        fast_updates, fast_state = fast_optimizer.update(updates, state.fast_state, params)
        sync = state.steps_since_sync == sync_period - 1

        # optax's merged step: with d = fast + u - slow, the slow params move by
        # alpha * sync * d and the fast update becomes u - sync * (1 - alpha) * d, which on
        # a synchronising step lands the fast params on the new slow ones.
        fast, spec = optree.tree_flatten(params, none_is_leaf=False)
        new_slow, new_updates = [], []
        for f, u, s in zip(
            fast, spec.flatten_up_to(fast_updates), spec.flatten_up_to(state.slow), strict=True
        ):
            diff = f.detach() + u - s
            on = sync.to(diff.dtype)
            new_slow.append(s + slow_step_size * on * diff)
            new_updates.append(u - on * (1 - slow_step_size) * diff)
        if reset_state:
            fast_state = tree_where(sync, fast_optimizer.init(params), fast_state)
        steps = (state.steps_since_sync + 1) % sync_period
        slow = optree.tree_unflatten(spec, new_slow)
        return optree.tree_unflatten(spec, new_updates), LookaheadState(fast_state, steps, slow)

    return GradientTransformation(init, update)
