"""Adafactor: ``torch.optim.Adafactor``'s ``foreach`` step (see :mod:`.foreach_step`).

Leaves with two or more dimensions keep a factored second moment (a row and a column
factor over the last two dimensions); vectors and scalars keep a full one, as in torch.
Adafactor is not element-wise (it reads each leaf's norm), so it is not for
``make_ensemble_train_step``, which steps all members' stacked leaves at once, and it
refuses a leaf the sharded step splits across ranks (:mod:`.shards`).

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.adafactor(lr=0.01)
    >>> params = {"w": torch.ones(2, 3), "b": torch.ones(3)}
    >>> state = opt.init(params)
    >>> state[-1].row_var["w"].shape, state[-1].col_var["w"].shape, state[-1].variance["w"]
    (torch.Size([2, 1]), torch.Size([1, 3]), tensor([]))
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, tree_map
from .base import GradientTransformation, chain, zero_count
from .fast_path import host_number
from .foreach_step import Number, fails, hyperparams_at, maximum, minimum, torch_step
from .shards import require_whole
from .transforms import ScalarOrSchedule, track_learning_rate

__all__ = ["AdafactorState", "adafactor", "is_factored"]


class AdafactorState(NamedTuple):
    """Adafactor's step count and second-moment estimates: ``row_var`` and ``col_var`` for
    the leaves that :func:`is_factored`, ``variance`` for the others. Where a leaf has no
    such estimate (torch's state has no such key) the tree holds an empty tensor, not
    ``None``: Dynamo cannot flatten a dict whose values are all ``None`` (a tree of
    matrices only), so such a state would not compile."""

    count: Tensor
    row_var: PyTree
    col_var: PyTree
    variance: PyTree


def is_factored(p: Tensor) -> bool:
    """Whether Adafactor keeps a factored second moment (``row_var``, ``col_var``) for the
    param ``p`` (two or more dimensions, as torch), else a full one (``variance``).

    Example:
        >>> is_factored(torch.ones(2, 3)), is_factored(torch.ones(3))
        (True, False)
    """
    return p.dim() > 1


def adafactor(
    lr: ScalarOrSchedule = 1e-2,
    beta2_decay: float = -0.8,
    eps: tuple[float | None, float] = (None, 1e-3),
    d: float = 1.0,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adafactor``: factored second moments, relative step sizes, update
    clipping, and decoupled weight decay ``p * (1 - lr * wd)``.

    Args:
        lr: the maximum relative step size (and the weight decay's factor), or a schedule.
        beta2_decay, eps, d, weight_decay, maximize: as in ``torch.optim.Adafactor``;
            ``eps[0] = None`` is each leaf's ``torch.finfo(dtype).eps`` (torch's foreach step
            takes the first dtype group's for all, which differs only in a tree that mixes
            float dtypes).

    Returns:
        The optimiser; its last state is an :class:`AdafactorState`.

    Example:
        >>> import torch
        >>> opt = adafactor(0.5)
        >>> p = {"w": torch.full((1,), 2.0)}
        >>> opt.update({"w": torch.full((1,), 3.0)}, opt.init(p), p)[0]  # -rms(p) * min(lr, 1)
        {'w': tensor([-1.])}
    """
    if not callable(lr) and fails(lr, lambda v: v >= 0.0):
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if not beta2_decay <= 0.0:
        raise ValueError(f"beta2_decay should be <= 0 but is: {beta2_decay}")
    eps1, eps2 = eps
    if eps1 is not None and not eps1 >= 0.0:
        raise ValueError(f"epsilon1 should be >= 0 but is: {eps1}")
    if not eps2 >= 0.0:
        raise ValueError(f"epsilon2 should be >= 0 but is: {eps2}")
    if not d >= 1.0:
        raise ValueError(f"Clipping threshold d should be >= 1 but is: {d}")
    if fails(weight_decay, lambda v: v >= 0.0):
        raise ValueError(f"weight_decay should be >= 0 but is: {weight_decay}")

    def init(params: PyTree) -> AdafactorState:
        def row(p: Tensor) -> Tensor:
            return p.new_zeros((*p.shape[:-1], 1)) if is_factored(p) else p.new_zeros(0)

        def col(p: Tensor) -> Tensor:
            if not is_factored(p):
                return p.new_zeros(0)
            return p.new_zeros((*p.shape[:-2], 1, p.shape[-1]))

        def full(p: Tensor) -> Tensor:
            return p.new_zeros(0) if is_factored(p) else torch.zeros_like(p)

        return AdafactorState(
            zero_count(params), tree_map(row, params), tree_map(col, params), tree_map(full, params)
        )

    def number(value: Tensor, traced: bool) -> Number:
        """A norm as torch reads it (``.item()``), or as a float64 tensor when traced."""
        return value.to(torch.float64) if traced else host_number(value)

    def step(grads, params, state: AdafactorState, t: Number, lr: Number):
        traced = torch.is_tensor(t)
        if maximize:
            grads = torch._foreach_neg(grads)
        one_minus_beta2 = t**beta2_decay
        rho = minimum(lr, 1 / (t**0.5))
        # alpha from the params before the decay, as torch reads p.norm() first.
        alphas = [
            maximum(eps2, number(p.norm(2), traced) / (p.numel() ** 0.5)) * rho for p in params
        ]
        (wd,) = hyperparams_at(t, weight_decay)
        if isinstance(wd, Tensor) or wd != 0:  # injected and traced: no branch on it
            decay = 1 - lr * wd
            params = [p * (decay.to(p.dtype) if traced else decay) for p in params]
        row_vars, col_vars, variances, new_params = [], [], [], []
        for i, (p, g) in enumerate(zip(params, grads, strict=True)):
            weight = one_minus_beta2.to(g.dtype) if traced else one_minus_beta2
            floor = torch.finfo(p.dtype).eps if eps1 is None else eps1
            if is_factored(g):
                row_mean = torch.linalg.vector_norm(g, dim=-1, keepdim=True)
                row_var = torch.lerp(state.row_var[i], row_mean * row_mean / g.size(-1), weight)
                col_mean = torch.linalg.vector_norm(g, dim=-2, keepdim=True)
                col_var = torch.lerp(state.col_var[i], col_mean * col_mean / g.size(-2), weight)
                estimate = row_var @ col_var
                estimate = estimate / row_var.mean(dim=-2, keepdim=True).clamp_min(floor)
                row_vars.append(row_var)
                col_vars.append(col_var)
                variances.append(state.variance[i])  # the empty placeholder, as it came
            else:
                estimate = torch.lerp(state.variance[i], g * g, weight)
                row_vars.append(state.row_var[i])
                col_vars.append(state.col_var[i])
                variances.append(estimate)
            update = estimate.clamp_min(floor * floor).rsqrt() * g
            clipped = maximum(1.0, number(update.norm(2), traced) / ((update.numel() ** 0.5) * d))
            factor = -alphas[i] / clipped
            new_params.append(p + update * (factor.to(update.dtype) if traced else factor))
        return new_params, AdafactorState(state.count, row_vars, col_vars, variances)

    def whole_leaves(params: PyTree) -> None:
        require_whole(params, "adafactor", "reads each whole leaf (its RMS, its column factor)")

    return chain(track_learning_rate(lr), torch_step("adafactor", init, step, lr, whole_leaves))
