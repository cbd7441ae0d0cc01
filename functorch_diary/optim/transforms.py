"""Small gradient transformations; the named optimisers are ``chain`` s of these.

Each one reproduces one line of ``torch.optim``'s update, in the same order of floating
point operations, so a chain matches ``torch.optim`` step for step. Step-dependent
choices (SGD's first momentum buffer, Adam's bias correction) are arithmetic on a
``count`` tensor, never Python branches on the step, so a compiled step never re-traces.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Union

import torch
from torch import Tensor

from ..tree import PyTree, tree_add, tree_leaves, tree_map, tree_scale, tree_unflatten_like
from .base import EmptyState, GradientTransformation

__all__ = [
    "Schedule",
    "ScalarOrSchedule",
    "add_decayed_weights",
    "trace",
    "TraceState",
    "scale_by_adam",
    "ScaleByAdamState",
    "scale_by_learning_rate",
    "ScaleByLearningRateState",
]

#: A learning-rate schedule: ``step (int64 tensor) -> lr (float tensor)``.
Schedule = Callable[[Tensor], Tensor]
ScalarOrSchedule = Union[float, Schedule]


def _zero_count(params: PyTree) -> Tensor:
    leaves = tree_leaves(params)
    return torch.zeros((), dtype=torch.int64, device=leaves[0].device if leaves else None)


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """``g + weight_decay * p``: torch.optim's (coupled, L2) ``weight_decay``."""

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None):
        if weight_decay == 0.0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        return tree_add(updates, params, alpha=weight_decay), state

    return GradientTransformation(lambda params: EmptyState(), update)


class TraceState(NamedTuple):
    count: Tensor
    trace: PyTree


def trace(momentum: float, dampening: float = 0.0, nesterov: bool = False) -> GradientTransformation:
    """SGD's momentum buffer, exactly as ``torch.optim.SGD`` keeps it.

    The first buffer is the gradient itself (not ``(1 - dampening) * g``); later ones are
    ``momentum * buf + (1 - dampening) * g``. With ``nesterov`` the update is
    ``g + momentum * buf``, otherwise ``buf``.
    """
    if nesterov and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def init(params: PyTree) -> TraceState:
        return TraceState(_zero_count(params), tree_map(torch.zeros_like, params))

    def update(updates: PyTree, state: TraceState, params: PyTree | None = None):
        # later = 0 on the first step, 1 after: 0 * buf + 1 * g is exactly g.
        later = (state.count > 0).to(torch.float64)
        kept = tree_scale(state.trace, (momentum * later).to(_dtype(updates)))
        fresh = tree_scale(updates, (1.0 - dampening * later).to(_dtype(updates)))
        buf = tree_add(kept, fresh)
        out = tree_add(updates, buf, alpha=momentum) if nesterov else buf
        return out, TraceState(state.count + 1, buf)

    return GradientTransformation(init, update)


def _dtype(tree: PyTree) -> torch.dtype:
    leaves = tree_leaves(tree)
    return leaves[0].dtype if leaves else torch.get_default_dtype()


class ScaleByAdamState(NamedTuple):
    count: Tensor
    mu: PyTree
    nu: PyTree


def scale_by_adam(b1: float = 0.9, b2: float = 0.999, eps: float = 1e-8) -> GradientTransformation:
    """Adam's direction as ``torch.optim.Adam`` computes it, before the learning rate.

    ``m / bc1 / (sqrt(v) / sqrt(bc2) + eps)`` with ``bc_i = 1 - b_i ** step``: eps is
    added *after* the bias correction of ``v``, as torch does (optax adds it before).
    """

    def init(params: PyTree) -> ScaleByAdamState:
        zeros = tree_map(torch.zeros_like, params)
        return ScaleByAdamState(_zero_count(params), zeros, tree_map(torch.zeros_like, params))

    def update(updates: PyTree, state: ScaleByAdamState, params: PyTree | None = None):
        count = state.count + 1
        grads = tree_leaves(updates)
        if not grads:
            return updates, ScaleByAdamState(count, state.mu, state.nu)
        mu = torch._foreach_lerp(tree_leaves(state.mu), grads, 1.0 - b1)
        nu = torch._foreach_mul(tree_leaves(state.nu), b2)
        torch._foreach_addcmul_(nu, grads, grads, value=1.0 - b2)  # nu is ours: fresh tensors
        # Bias corrections in float64, as torch computes them in Python floats.
        step = count.to(torch.float64)
        bc1 = (1.0 - b1**step).to(grads[0].dtype)
        bc2_sqrt = torch.sqrt(1.0 - b2**step).to(grads[0].dtype)
        denom = torch._foreach_add(torch._foreach_div(torch._foreach_sqrt(nu), bc2_sqrt), eps)
        direction = torch._foreach_div(torch._foreach_div(mu, denom), bc1)
        return tree_unflatten_like(updates, direction), ScaleByAdamState(
            count, tree_unflatten_like(updates, mu), tree_unflatten_like(updates, nu)
        )

    return GradientTransformation(init, update)


class ScaleByLearningRateState(NamedTuple):
    count: Tensor


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """Multiply by ``-learning_rate`` (a float, or a schedule of the step count)."""

    def init(params: PyTree) -> ScaleByLearningRateState:
        return ScaleByLearningRateState(_zero_count(params))

    def update(updates: PyTree, state: ScaleByLearningRateState, params: PyTree | None = None):
        if callable(learning_rate):
            lr = learning_rate(state.count).to(_dtype(updates))
        else:
            lr = learning_rate
        return tree_scale(updates, -lr), ScaleByLearningRateState(state.count + 1)

    return GradientTransformation(init, update)
