"""NAdam, RAdam and Adamax: Adam's relatives, each ``torch.optim``'s ``foreach`` step.

Each takes its ``torch.optim`` twin's arguments with the same defaults (``lr`` may also be
a schedule ``step -> lr``) and follows ``_multi_tensor_<name>`` kernel for kernel (see
:mod:`.foreach_step`): :func:`~functorch_diary.optim.apply_gradients` is torch's
``foreach=True`` step to the bit, ``update`` + ``apply_updates`` the same params.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.nadam(lr=0.1)
    >>> params = {"w": torch.ones(2)}
    >>> params, state = optim.apply_gradients(opt, {"w": torch.ones(2)}, opt.init(params), params)
    >>> params["w"]
    tensor([0.8944, 0.8944])
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, tree_map
from .base import GradientTransformation, chain, zero_count
from .fast_path import host_number
from .foreach_step import (
    Number,
    add_scaled,
    addcdiv,
    addcmul,
    cast,
    fails,
    hyperparams_at,
    lerp,
    scalar_dtype,
    then,
    torch_step,
    where,
)
from .transforms import ScalarOrSchedule, track_learning_rate

__all__ = ["AdamaxState", "NAdamState", "RAdamState", "adamax", "nadam", "radam"]


def _check_adam_args(lr: ScalarOrSchedule, betas: tuple[float, float], eps: float, wd: float):
    """torch's own argument checks, with its messages (see :func:`.foreach_step.fails`)."""
    if not callable(lr) and fails(lr, lambda v: v >= 0.0):
        raise ValueError(f"Invalid learning rate: {lr}")
    if fails(eps, lambda v: v >= 0.0):
        raise ValueError(f"Invalid epsilon value: {eps}")
    for index, beta in enumerate(betas):
        if fails(beta, lambda v: 0.0 <= v < 1.0):
            raise ValueError(f"Invalid beta parameter at index {index}: {beta}")
    if fails(wd, lambda v: v >= 0.0):
        raise ValueError(f"Invalid weight_decay value: {wd}")


def _decay(
    grads: list[Tensor], params: list[Tensor], lr: Number, weight_decay: float, decoupled: bool
) -> tuple[list[Tensor], list[Tensor]]:
    """torch's weight decay: ``p * (1 - lr * wd)`` (decoupled) or ``g + wd * p`` (L2)."""
    if not isinstance(weight_decay, Tensor) and weight_decay == 0:
        return grads, params
    if decoupled:
        return grads, list(torch._foreach_mul(params, cast(1 - lr * weight_decay, params)))
    return add_scaled(grads, params, weight_decay), params


def _moments(grads, exp_avg, exp_avg_sq, beta1: Number, beta2: Number, own: bool):
    """Adam's running moments, as torch's ``lerp_`` then ``mul_`` + ``addcmul_`` (tensor
    kernels for injected, traced betas)."""
    exp_avg = lerp(exp_avg, grads, 1 - beta1)
    exp_avg_sq = list(torch._foreach_mul(exp_avg_sq, cast(beta2, exp_avg_sq)))
    if isinstance(beta2, Tensor):
        return exp_avg, addcmul(exp_avg_sq, grads, grads, 1 - beta2)
    exp_avg_sq = then(own, "addcmul", exp_avg_sq, grads, grads, value=1 - beta2)
    return exp_avg, exp_avg_sq


def _zeros(params: PyTree) -> PyTree:
    return tree_map(torch.zeros_like, params)


class NAdamState(NamedTuple):
    """NAdam's step count, the product of its momentum coefficients (``mu_product``, in
    torch's scalar dtype, float32 unless the default dtype is float64, as torch keeps it)
    and its moments."""

    count: Tensor
    mu_product: Tensor
    exp_avg: PyTree
    exp_avg_sq: PyTree


def nadam(
    lr: ScalarOrSchedule = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum_decay: float = 4e-3,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.NAdam``: Adam with Nesterov momentum and a momentum schedule.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        betas, eps, weight_decay, momentum_decay, decoupled_weight_decay, maximize: as in
            ``torch.optim.NAdam`` (``decoupled_weight_decay=True`` is NAdamW's decay
            ``p * (1 - lr * wd)``).

    Returns:
        The optimiser; its last state is a :class:`NAdamState`.

    Example:
        >>> import torch
        >>> opt = nadam(0.1, decoupled_weight_decay=True, weight_decay=0.5)
        >>> p = {"w": torch.ones(1)}
        >>> opt.update({"w": torch.ones(1)}, opt.init(p), p)[0]
        {'w': tensor([-0.1556])}
    """
    _check_adam_args(lr, betas, eps, weight_decay)
    if fails(momentum_decay, lambda v: v >= 0.0):
        raise ValueError(f"Invalid momentum_decay value: {momentum_decay}")

    def init(params: PyTree) -> NAdamState:
        count = zero_count(params)
        mu_product = torch.ones((), dtype=scalar_dtype(), device=count.device)
        return NAdamState(count, mu_product, _zeros(params), _zeros(params))

    def step(grads, params, state: NAdamState, t: Number, lr: Number):
        beta1, beta2, wd = hyperparams_at(t, *betas, weight_decay)
        if maximize:
            grads = torch._foreach_neg(grads)
        grads, params = _decay(grads, params, lr, wd, decoupled_weight_decay)
        own = not torch.is_tensor(t)  # plain eager: write into what this step made
        exp_avg, exp_avg_sq = _moments(grads, state.exp_avg, state.exp_avg_sq, beta1, beta2, own)
        denom = list(torch._foreach_sqrt(exp_avg_sq))
        bias_correction_sqrt = (1 - beta2**t) ** 0.5
        mu = beta1 * (1.0 - 0.5 * (0.96 ** (t * momentum_decay)))
        mu_next = beta1 * (1.0 - 0.5 * (0.96 ** ((t + 1) * momentum_decay)))
        # torch multiplies its float32 (scalar dtype) mu_product by the Python float mu.
        factor = mu.to(state.mu_product.dtype) if torch.is_tensor(mu) else mu
        mu_product = state.mu_product * factor
        denom = then(own, "div", denom, cast(bias_correction_sqrt, denom))
        denom = then(own, "add", denom, eps)
        product = mu_product.to(torch.float64) if torch.is_tensor(t) else host_number(mu_product)
        step_size_grads = (lr * (1.0 - mu) / (1.0 - product)) * -1
        step_size_exp_avg = (lr * mu_next / (1.0 - product * mu_next)) * -1
        params = addcdiv(params, grads, denom, step_size_grads)
        params = addcdiv(params, exp_avg, denom, step_size_exp_avg, own)
        return params, NAdamState(state.count, mu_product, exp_avg, exp_avg_sq)

    return chain(track_learning_rate(lr), torch_step("nadam", init, step, lr))


class RAdamState(NamedTuple):
    """RAdam's step count and moments."""

    count: Tensor
    exp_avg: PyTree
    exp_avg_sq: PyTree


def radam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    decoupled_weight_decay: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.RAdam``: Adam whose adaptive step is switched on (rectified) once the
    variance estimate is trustworthy (SMA length > 5); before that, momentum SGD.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        betas, eps, weight_decay, decoupled_weight_decay, maximize: as in
            ``torch.optim.RAdam`` (``decoupled_weight_decay=True``: RAdamW's decay).

    Returns:
        The optimiser; its last state is a :class:`RAdamState`.

    Example:
        >>> import torch
        >>> opt = radam(0.1)
        >>> p = {"w": torch.zeros(1)}
        >>> opt.update({"w": torch.full((1,), 3.0)}, opt.init(p), p)[0]  # unrectified
        {'w': tensor([-0.3000])}
    """
    _check_adam_args(lr, betas, eps, weight_decay)

    def rectification(rho_t: Number, rho_inf: Number) -> Number:
        def ratio() -> Number:  # evaluated only where rho_t > 5, as torch does
            return (rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t)

        if torch.is_tensor(rho_t):  # both branches, then a select (no Python branch on t)
            return torch.where(rho_t > 5, ratio().clamp(min=0) ** 0.5, 0.0)
        return ratio() ** 0.5 if rho_t > 5 else 0

    def init(params: PyTree) -> RAdamState:
        return RAdamState(zero_count(params), _zeros(params), _zeros(params))

    def step(grads, params, state: RAdamState, t: Number, lr: Number):
        beta1, beta2, wd = hyperparams_at(t, *betas, weight_decay)
        if maximize:
            grads = torch._foreach_neg(grads)
        rho_inf = 2 / (1 - beta2) - 1  # the maximum length of the approximated SMA
        rho_t = rho_inf - 2 * t * (beta2**t) / (1 - beta2**t)
        grads, params = _decay(grads, params, lr, wd, decoupled_weight_decay)
        own = not torch.is_tensor(t)  # plain eager: write into what this step made
        exp_avg, exp_avg_sq = _moments(grads, state.exp_avg, state.exp_avg_sq, beta1, beta2, own)
        rect = rectification(rho_t, rho_inf)
        unrectified = where(rect > 0, 0, 1.0)
        bias_correction1 = 1 - beta1**t
        unrect_step_size = (lr * unrectified / bias_correction1) * -1
        # sqrt(1 - beta2^t) * rect * lr / bc1, negated: -0.0 while unrectified, as in torch,
        # which turns the buffer below into -0.0 + unrect_step_size.
        bias_correction2 = ((1 - beta2**t) ** 0.5) * (lr * rect / bias_correction1) * -1
        buffer = list(torch._foreach_sqrt(exp_avg_sq))
        buffer = then(own, "add", buffer, eps)
        buffer = then(own, "div", buffer, cast(bias_correction2, buffer))
        buffer = then(own, "reciprocal", buffer)
        buffer = then(own, "add", buffer, cast(unrect_step_size, buffer))
        params = list(torch._foreach_addcmul(params, exp_avg, buffer))
        return params, RAdamState(state.count, exp_avg, exp_avg_sq)

    return chain(track_learning_rate(lr), torch_step("radam", init, step, lr))


class AdamaxState(NamedTuple):
    """Adamax's step count, first moment and exponentially weighted infinity norm."""

    count: Tensor
    exp_avg: PyTree
    exp_inf: PyTree


def adamax(
    lr: ScalarOrSchedule = 2e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adamax``: Adam with the infinity norm ``max(b2 * u, |g| + eps)``.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        betas, eps, weight_decay, maximize: as in ``torch.optim.Adamax``.

    Returns:
        The optimiser; its last state is an :class:`AdamaxState`.

    Example:
        >>> import torch
        >>> opt = adamax(0.1)
        >>> p = {"w": torch.zeros(1)}
        >>> opt.update({"w": torch.full((1,), -2.0)}, opt.init(p), p)[0]
        {'w': tensor([0.1000])}
    """
    _check_adam_args(lr, betas, eps, weight_decay)

    def init(params: PyTree) -> AdamaxState:
        return AdamaxState(zero_count(params), _zeros(params), _zeros(params))

    def step(grads, params, state: AdamaxState, t: Number, lr: Number):
        beta1, beta2, wd = hyperparams_at(t, *betas, weight_decay)
        if maximize:
            grads = torch._foreach_neg(grads)
        grads, params = _decay(grads, params, lr, wd, decoupled=False)
        exp_avg = lerp(state.exp_avg, grads, 1 - beta1)
        own = not torch.is_tensor(t)  # plain eager: write into what this step made
        exp_inf = list(torch._foreach_mul(state.exp_inf, cast(beta2, state.exp_inf)))
        bound = then(own, "add", list(torch._foreach_abs(grads)), eps)
        exp_inf = then(own, "maximum", exp_inf, bound)
        step_size = (lr / (1 - beta1**t)) * -1
        params = addcdiv(params, exp_avg, exp_inf, step_size)
        return params, AdamaxState(state.count, exp_avg, exp_inf)

    return chain(track_learning_rate(lr), torch_step("adamax", init, step, lr))
