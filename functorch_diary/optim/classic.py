"""Adadelta, ASGD and Rprop, each ``torch.optim``'s ``foreach`` step (see :mod:`.foreach_step`).

Same arguments and defaults as the ``torch.optim`` twins; ``lr`` may be a schedule ``step ->
lr`` (Rprop reads it once, for its initial step sizes, as torch does).
:func:`~functorch_diary.optim.apply_gradients` is torch's ``foreach=True`` step to the bit.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.rprop(lr=0.1)
    >>> params = {"w": torch.zeros(2)}
    >>> params, state = optim.apply_gradients(
    ...     opt, {"w": torch.tensor([1.0, -1.0])}, opt.init(params), params)
    >>> params["w"]
    tensor([-0.1000,  0.1000])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, tree_map
from .base import GradientTransformation, chain, learning_rate_at, zero_count
from .foreach_step import Number, add_scaled, fails, hyperparams_at, scalar_dtype, then, torch_step
from .transforms import ScalarOrSchedule, track_learning_rate

__all__ = ["ASGDState", "AdadeltaState", "RpropState", "adadelta", "asgd", "rprop"]


def _check_lr(lr: ScalarOrSchedule) -> None:
    if not callable(lr) and fails(lr, lambda v: v >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")


def _l2(grads: list[Tensor], params: list[Tensor], maximize: bool, weight_decay: Number):
    """torch's ``-g`` (maximize) then ``g + wd * p`` (an injected, traced ``wd`` always)."""
    if maximize:
        grads = torch._foreach_neg(grads)
    if isinstance(weight_decay, Tensor) or weight_decay != 0:
        grads = add_scaled(list(grads), params, weight_decay)
    return list(grads)


class AdadeltaState(NamedTuple):
    """Adadelta's step count and running averages of squared gradients and updates."""

    count: Tensor
    square_avg: PyTree
    acc_delta: PyTree


def adadelta(
    lr: ScalarOrSchedule = 1.0,
    rho: float = 0.9,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adadelta``: ``delta = sqrt(acc_delta + eps) / sqrt(v + eps) * g``.

    Args:
        lr: learning rate (a factor on the delta), or a schedule ``step -> lr``.
        rho, eps, weight_decay, maximize: as in ``torch.optim.Adadelta``.

    Returns:
        The optimiser; its last state is an :class:`AdadeltaState`.

    Example:
        >>> import torch
        >>> opt = adadelta(rho=0.0, eps=0.0)
        >>> p = {"w": torch.zeros(1)}
        >>> opt.update({"w": torch.full((1,), 2.0)}, opt.init(p), p)[0]  # sqrt(0 + eps) = 0
        {'w': tensor([0.])}
    """
    _check_lr(lr)
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"Invalid rho value: {rho}")
    if not eps >= 0.0:
        raise ValueError(f"Invalid epsilon value: {eps}")
    if fails(weight_decay, lambda v: v >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")

    def init(params: PyTree) -> AdadeltaState:
        zeros = tree_map(torch.zeros_like, params)
        return AdadeltaState(zero_count(params), zeros, tree_map(torch.zeros_like, params))

    def step(grads, params, state: AdadeltaState, t: Number, lr: Number):
        grads = _l2(grads, params, maximize, *hyperparams_at(t, weight_decay))
        own = not torch.is_tensor(t)  # plain eager: write into what this step made
        square_avg = list(torch._foreach_mul(state.square_avg, rho))
        square_avg = then(own, "addcmul", square_avg, grads, grads, value=1 - rho)
        std = then(own, "sqrt", list(torch._foreach_add(square_avg, eps)))
        deltas = then(own, "sqrt", list(torch._foreach_add(state.acc_delta, eps)))
        deltas = then(own, "mul", then(own, "div", deltas, std), grads)
        acc_delta = list(torch._foreach_mul(state.acc_delta, rho))
        acc_delta = then(own, "addcmul", acc_delta, deltas, deltas, value=1 - rho)
        params = add_scaled(params, deltas, -lr)
        return params, AdadeltaState(state.count, square_avg, acc_delta)

    return chain(track_learning_rate(lr), torch_step("adadelta", init, step, lr))


class ASGDState(NamedTuple):
    """ASGD's step count, its step size ``eta`` and averaging rate ``mu`` (0-dim, in
    torch's scalar dtype: float32 unless the default dtype is float64, as torch keeps them),
    and the averaged params ``ax`` (torch's ``state["ax"]``, the point ASGD converges to)."""

    count: Tensor
    eta: Tensor
    mu: Tensor
    ax: PyTree


def asgd(
    lr: ScalarOrSchedule = 1e-2,
    lambd: float = 1e-4,
    alpha: float = 0.75,
    t0: float = 1e6,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.ASGD``: SGD with a decaying step ``eta = lr / (1 + lambd lr t)^alpha``
    and a running average ``ax`` of the iterates from step ``t0`` on.

    Follows torch's ``foreach`` step, whose ``eta`` arithmetic runs in torch's scalar dtype;
    torch's default single-tensor loop rounds ``eta`` differently (float64, then float32),
    up to 1.5e-7 from its foreach step after 50 float64 steps.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        lambd, alpha, t0, weight_decay, maximize: as in ``torch.optim.ASGD``.

    Returns:
        The optimiser; its last state is an :class:`ASGDState`.

    Example:
        >>> import torch
        >>> opt = asgd(0.1, lambd=0.0)
        >>> p = {"w": torch.zeros(1)}
        >>> opt.update({"w": torch.ones(1)}, opt.init(p), p)[0]
        {'w': tensor([-0.1000])}
    """
    _check_lr(lr)
    if fails(weight_decay, lambda v: v >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {weight_decay}")

    def init(params: PyTree) -> ASGDState:
        count = zero_count(params)
        eta = learning_rate_at(lr, count).to(scalar_dtype())
        mu = torch.ones((), dtype=scalar_dtype(), device=count.device)
        return ASGDState(count, eta, mu, tree_map(torch.zeros_like, params))

    def step(grads, params, state: ASGDState, t: Number, lr: Number):
        grads = _l2(grads, params, maximize, *hyperparams_at(t, weight_decay))
        intermediate = torch._foreach_add(grads, params, alpha=lambd)
        # param * (1 - lambd * eta) - eta * grad, as torch's one addcmul with eta.
        etas = [state.eta] * len(params)
        params = list(torch._foreach_addcmul(params, intermediate, etas, value=-1))
        ax = torch._foreach_addcmul(
            state.ax, torch._foreach_sub(params, state.ax), [state.mu] * len(params)
        )
        # torch computes the next eta in tensor arithmetic on its float32 (scalar dtype)
        # step, and the next mu in Python floats, then stores both in that dtype.
        dtype = state.eta.dtype
        step_t = torch.as_tensor(t, device=state.eta.device).to(dtype)
        decay = (lambd * lr).to(dtype) if torch.is_tensor(lr) else lambd * lr
        # Python's float / tensor is torch's reciprocal(tensor) * float: the same here.
        eta = torch.reciprocal((1 + decay * step_t) ** alpha) * (
            lr.to(dtype) if torch.is_tensor(lr) else lr
        )
        if torch.is_tensor(t):
            mu = (1 / torch.clamp(t - t0, min=1)).to(dtype)
        else:
            mu = torch.tensor(1 / max(1, t - t0), dtype=dtype, device=state.mu.device)
        return params, ASGDState(state.count, eta, mu, list(ax))

    return chain(track_learning_rate(lr), torch_step("asgd", init, step, lr))


class RpropState(NamedTuple):
    """Rprop's step count, previous (sign-masked) gradients and per-element step sizes."""

    count: Tensor
    prev: PyTree
    step_size: PyTree


def rprop(
    lr: ScalarOrSchedule = 1e-2,
    etas: tuple[float, float] = (0.5, 1.2),
    step_sizes: tuple[float, float] = (1e-6, 50),
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Rprop``: per-element step sizes grown by ``etaplus`` while the gradient
    keeps its sign and shrunk by ``etaminus`` when it flips (then that element waits a step).

    Args:
        lr: the initial step size (a schedule is read at step 0 only, as torch reads ``lr``
            only when it creates the state).
        etas, step_sizes, maximize: as in ``torch.optim.Rprop``.

    Returns:
        The optimiser; its last state is an :class:`RpropState`.

    Example:
        >>> import torch
        >>> opt = rprop(0.5)
        >>> p = {"w": torch.zeros(1)}
        >>> s = opt.init(p)
        >>> u, s = opt.update({"w": torch.ones(1)}, s, p)
        >>> opt.update({"w": torch.ones(1)}, s, p)[0]  # same sign: 0.5 * 1.2
        {'w': tensor([-0.6000])}
    """
    _check_lr(lr)
    etaminus, etaplus = etas
    if not 0.0 < etaminus < 1.0 < etaplus:
        raise ValueError(f"Invalid eta values: {etaminus}, {etaplus}")
    step_size_min, step_size_max = step_sizes

    def init(params: PyTree) -> RpropState:
        count = zero_count(params)
        first = learning_rate_at(lr, count).item() if callable(lr) else lr
        step_size = tree_map(lambda p: torch.full_like(p, first), params)
        return RpropState(count, tree_map(torch.zeros_like, params), step_size)

    def step(grads, params, state: RpropState, t: Number, lr: Number):
        signs = torch._foreach_mul(grads, state.prev)
        if maximize:
            signs = torch._foreach_neg(signs)
            grads = torch._foreach_neg(grads)
        factors = [
            torch.where(s > 0, etaplus, torch.where(s < 0, etaminus, torch.where(s == 0, 1, s)))
            for s in torch._foreach_sign(signs)
        ]
        step_size = [
            s.clamp(step_size_min, step_size_max)
            for s in torch._foreach_mul(state.step_size, factors)
        ]
        # Where the sign flipped the gradient counts as 0: no step now, no flip next time.
        prev = [torch.where(f == etaminus, 0, g) for f, g in zip(factors, grads, strict=True)]
        signed = [g.sign() for g in prev]
        params = list(torch._foreach_addcmul(params, signed, step_size, value=-1))
        return params, RpropState(state.count, prev, step_size)

    return chain(track_learning_rate(lr), torch_step("rprop", init, step, lr))
