"""Projections: pure maps ``params -> params`` applied *after* the optimiser's update.

WGAN's weight clipping is ``for p in D.parameters():
p.data.clamp_(-c, c)`` after ``optimizer.step()``: an in-place write through ``.data``
that autograd never sees. Here it is a projection, a pure function of the new params:

    params = projection(apply_updates(params, updates))

Why not a ``GradientTransformation`` in ``optim.chain(rmsprop(...), clip(...))``? A
transformation can only hand back *updates*, which ``apply_updates`` adds to the params,
and ``p + (clamp(p + u, -c, c) - p)`` is not ``clamp(p + u, -c, c)`` in floating point:
the "clipped" weights would leave ``[-c, c]`` by a rounding error and drift from the
imperative ``clamp_``. A projection returns the clipped weights themselves, bit for bit
what ``clamp_`` writes. The GAN steps (:mod:`functorch_diary.training.gan`) take one as
``projection=``; :func:`project_step` adds one to any step built by
:func:`~functorch_diary.make_train_step`.

Example:
    >>> import torch
    >>> from functorch_diary.training.projections import clip_params
    >>> clip = clip_params(-0.01, 0.01)
    >>> clip({"w": torch.tensor([-1.0, 0.005, 2.0])})
    {'w': tensor([-0.0100,  0.0050,  0.0100])}
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..tree import Params, Selector, select, tree_flatten_with_paths, tree_unflatten_like
from .step import TrainState

__all__ = ["Projection", "clip_params", "project_step"]

#: A projection: new params from params, e.g. :func:`clip_params`.
Projection = Callable[[Params], Params]


def clip_params(lo: float, hi: float, selector: Selector | None = None) -> Projection:
    """Clamp the selected params into ``[lo, hi]`` (all params when ``selector`` is None).

    The functional ``for p in D.parameters(): p.data.clamp_(lo, hi)``: same numbers, new
    tensors, the input params left alone. Idempotent, and its output always lies in
    ``[lo, hi]``.

    Args:
        lo, hi: the box (``lo <= hi``).
        selector: which leaves to clip, as for :func:`~functorch_diary.tree.select`
            (e.g. ``"*.weight"``); ``None`` clips every leaf, as the seed does.

    Returns:
        ``projection(params) -> params``.

    Example:
        >>> import torch
        >>> clip = clip_params(-1.0, 1.0, selector="*.weight")
        >>> out = clip({"fc.weight": torch.tensor([3.0]), "fc.bias": torch.tensor([3.0])})
        >>> out["fc.weight"].item(), out["fc.bias"].item()
        (1.0, 3.0)
    """
    if not lo <= hi:
        raise ValueError(f"clip_params needs lo <= hi, got lo={lo}, hi={hi}")

    def project(params: Params) -> Params:
        entries = tree_flatten_with_paths(params)
        if not entries:
            return params
        keep = (
            [True] * len(entries)
            if selector is None
            else [flag for _, flag in tree_flatten_with_paths(select(params, selector))]
        )
        chosen = [leaf for (_, leaf), flag in zip(entries, keep, strict=True) if flag]
        # One foreach kernel for all leaves; max then min is exactly torch.clamp.
        clipped = iter(torch._foreach_clamp_max(torch._foreach_clamp_min(chosen, lo), hi))
        leaves = [
            next(clipped) if flag else leaf for (_, leaf), flag in zip(entries, keep, strict=True)
        ]
        return tree_unflatten_like(params, leaves)

    return project


def project_step(step: Callable[..., tuple[TrainState, Any]], projection: Projection):
    """``step`` followed by ``projection`` of the new ``TrainState``'s params.

    Args:
        step: a training step ``step(train_state, batch) -> (train_state, metrics)``.
        projection: e.g. ``clip_params(-0.01, 0.01)``.

    Returns:
        A step with the same signature whose params are projected after every update.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from functorch_diary import Model, optim, init_train_state, make_train_step
        >>> model = Model(lambda: nn.Linear(3, 1))
        >>> step = project_step(make_train_step(model, nn.functional.mse_loss, optim.sgd(1.0)),
        ...                     clip_params(-0.01, 0.01))
        >>> batch = (torch.randn(4, 3), torch.randn(4, 1))
        >>> ts, _ = step(init_train_state(model, optim.sgd(1.0)), batch)
        >>> bool(ts.params["weight"].abs().max() <= 0.01)
        True
    """

    def projected(ts: TrainState, *args: Any, **kwargs: Any) -> tuple[TrainState, Any]:
        ts, metrics = step(ts, *args, **kwargs)
        return ts._replace(params=projection(ts.params)), metrics

    projected.__doc__ = step.__doc__
    return projected
