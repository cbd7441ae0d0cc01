"""Small gradient transformations; the named optimisers are ``chain`` s of these.

Each one reproduces one line of ``torch.optim``'s update, in the same order of floating
point operations, so a chain matches ``torch.optim`` step for step. Step-dependent
choices (SGD's first momentum buffer, Adam's bias correction, a schedule's value) are
arithmetic on a ``count`` tensor, never Python branches on the step, so a compiled step
never re-traces.

Every stage works on whole leaf lists with ``torch._foreach_*`` kernels. A stage never
writes into its inputs (the caller's grads, params or state); it only writes in place
into tensors it allocated itself during the same call, which saves allocations without
breaking purity.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.chain(optim.scale_by_rms(alpha=0.9), optim.scale_by_learning_rate(0.1))
    >>> params = {"w": torch.ones(2)}
    >>> updates, state = opt.update({"w": torch.tensor([1.0, -2.0])}, opt.init(params), params)
    >>> updates["w"]
    tensor([-0.3162,  0.3162])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import optree
import torch
from torch import Tensor

from ..tree import PyTree, tree_add, tree_leaves, tree_map, tree_nodes, tree_scale
from . import fused
from .base import (
    EmptyState,
    GradientTransformation,
    learning_rate_at,
    update_then_apply,
    zero_count,
)
from .fast_path import eager_leaves, host_number

__all__ = [
    "ScalarOrSchedule",
    "ScaleByAdamState",
    "ScaleByLearningRateState",
    "ScaleByRmsState",
    "ScaleByRssState",
    "ScaleByScheduleState",
    "Schedule",
    "TraceState",
    "add_decayed_weights",
    "current_lr",
    "learning_rate_at",
    "scale",
    "scale_by_adam",
    "scale_by_learning_rate",
    "scale_by_rms",
    "scale_by_rss",
    "scale_by_schedule",
    "trace",
    "track_learning_rate",
]

#: A learning-rate schedule: ``step (int64 tensor) -> lr (float64 tensor)``.
Schedule = Callable[[Tensor], Tensor]
ScalarOrSchedule = float | Schedule


def _flatten(tree: PyTree) -> tuple[list[Tensor], optree.PyTreeSpec]:
    return optree.tree_flatten(tree, none_is_leaf=False)


def _like(spec: optree.PyTreeSpec, leaves: list[Tensor]) -> PyTree:
    return optree.tree_unflatten(spec, leaves)


def _injected(*hyperparams: float | Tensor) -> bool:
    """Whether a hyperparameter is a tensor (from ``optim.inject_hyperparams``): then only
    tensor arithmetic touches it, never a Python branch or a host read, so a compiled step
    does not re-trace when its value changes."""
    return any(isinstance(h, Tensor) for h in hyperparams)


def _scalar(value: float | Tensor, leaves: list[Tensor]) -> float | Tensor:
    """A hyperparameter as a ``torch._foreach_*`` scalar: a number as it is, a tensor in
    the leaves' dtype."""
    return _as_dtype(value, leaves) if isinstance(value, Tensor) else value


def _host_numbers(*values: float | Tensor) -> list[float] | None:
    """``values`` as Python numbers for a fused kernel, or ``None`` where one cannot be read
    without a device synchronisation."""
    numbers = [host_number(v) for v in values]
    return None if any(n is None for n in numbers) else numbers


def scale(factor: float) -> GradientTransformation:
    """Multiply updates by a constant (``scale(-1.0)`` is torch's ``maximize=True``).

    Example:
        >>> import torch
        >>> scale(-1.0).update({"w": torch.tensor([1.0, -2.0])}, EmptyState())[0]
        {'w': tensor([-1.,  2.])}
    """

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None):
        return tree_scale(updates, factor), state

    return GradientTransformation(lambda params: EmptyState(), update)


def add_decayed_weights(weight_decay: float) -> GradientTransformation:
    """``g + weight_decay * p``: torch.optim's (coupled, L2) ``weight_decay``.

    After ``scale_by_adam`` and before the learning rate it is AdamW's decoupled decay.

    Args:
        weight_decay: the decay factor (0 makes this stage a no-op).

    Example:
        >>> import torch
        >>> p = {"w": torch.tensor([2.0])}
        >>> add_decayed_weights(0.5).update({"w": torch.tensor([1.0])}, EmptyState(), p)[0]
        {'w': tensor([2.])}
    """

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None):
        if not _injected(weight_decay) and weight_decay == 0.0:
            return updates, state
        if params is None:
            raise ValueError("add_decayed_weights needs params: call update(grads, state, params)")
        if _injected(weight_decay):
            leaves, spec = _flatten(updates)
            if not leaves:
                return updates, state
            decays = torch._foreach_mul(spec.flatten_up_to(params), _as_dtype(weight_decay, leaves))
            return _like(spec, torch._foreach_add(leaves, decays)), state
        return tree_add(updates, params, alpha=weight_decay), state

    return GradientTransformation(lambda params: EmptyState(), update)


class TraceState(NamedTuple):
    """SGD's momentum buffers and the number of steps taken."""

    count: Tensor
    trace: PyTree


def trace(
    momentum: float | Tensor,
    dampening: float | Tensor = 0.0,
    nesterov: bool = False,
    *,
    weight_decay: float = 0.0,
    learning_rate: ScalarOrSchedule | None = None,
) -> GradientTransformation:
    """SGD's momentum buffer, exactly as ``torch.optim.SGD`` keeps it.

    The first buffer is the gradient itself (not ``(1 - dampening) * g``); later ones are
    ``momentum * buf + (1 - dampening) * g``. With ``nesterov`` the update is
    ``g + momentum * buf``, otherwise ``buf``.

    Args:
        momentum: the momentum factor (a 0-dim tensor when injected, see
            :func:`~functorch_diary.optim.inject_hyperparams`).
        dampening: how much of the gradient is held back from the buffer (after step 1;
            a tensor when injected).
        nesterov: use Nesterov momentum (needs ``momentum > 0`` and ``dampening == 0``).
        weight_decay: torch's (coupled) ``weight_decay``, ``g + weight_decay * p``, added
            first: :func:`add_decayed_weights` inside this stage, so that the fused step
            folds it into its one pass as torch's kernel does.
        learning_rate: when given, the stage emits the whole update ``-lr * direction``
            and has a fused ``update_and_apply``: torch's ``fused=True`` SGD kernel (decay,
            momentum and ``-lr`` in one pass). Pair it with :func:`track_learning_rate`.

    Returns:
        A transformation whose state is a :class:`TraceState`.

    Example:
        >>> import torch
        >>> t = trace(0.9)
        >>> p = {"w": torch.zeros(1)}
        >>> u, s = t.update({"w": torch.ones(1)}, t.init(p))
        >>> t.update({"w": torch.ones(1)}, s)[0]
        {'w': tensor([1.9000])}
    """
    # Injected (tensor) values are checked as floats when inject_hyperparams builds.
    if nesterov and not _injected(momentum, dampening) and (momentum <= 0 or dampening != 0):
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def init(params: PyTree) -> TraceState:
        return TraceState(zero_count(params), tree_map(torch.zeros_like, params))

    decay = add_decayed_weights(weight_decay)

    def update(updates: PyTree, state: TraceState, params: PyTree | None = None):
        updates, _ = decay.update(updates, EmptyState(), params)
        grads, spec = _flatten(updates)
        if not grads:
            return updates, TraceState(state.count + 1, state.trace)
        # torch's kernels, in torch's rounding: buf * momentum, then + (1 - dampening) * g.
        # Injected (tensor) values take separate kernels, as an alpha must be a number.
        buf = torch._foreach_mul(tree_leaves(state.trace), _scalar(momentum, grads))
        if _injected(dampening):
            torch._foreach_add_(buf, torch._foreach_mul(grads, _as_dtype(1 - dampening, grads)))
        else:
            torch._foreach_add_(buf, grads, alpha=1.0 - dampening)
        if _injected(dampening) or dampening != 0.0:
            # torch's first buffer is g itself (from zeros, that is the sum above only
            # without dampening): chosen on the count tensor, not a Python branch.
            first = state.count == 0
            buf = [torch.where(first, g, b) for g, b in zip(grads, buf, strict=True)]
        if nesterov and _injected(momentum):
            out = torch._foreach_add(grads, torch._foreach_mul(buf, _as_dtype(momentum, grads)))
        else:
            out = torch._foreach_add(grads, buf, alpha=momentum) if nesterov else buf
        if learning_rate is not None:
            out = torch._foreach_mul(
                out, _as_dtype(-learning_rate_at(learning_rate, state.count), out)
            )
        return _like(spec, out), TraceState(state.count + 1, _like(spec, buf))

    def update_and_apply(updates: PyTree, state: TraceState, params: PyTree):
        grads, spec, base, lr = _fast_path_inputs(
            updates, state, params, learning_rate, (state.trace,)
        )
        numbers = None
        if lr is not None:
            numbers = _host_numbers(state.count, weight_decay, momentum, dampening)
        # An injected momentum of 0 still keeps a buffer here, and torch's fused kernel
        # takes none at momentum 0: that step takes the update path.
        if numbers is None or numbers[2] == 0.0:
            return update_then_apply(update, updates, state, params)
        done, decay, momentum_now, dampening_now = numbers
        new_params, buffers = fused.sgd(
            base,
            grads,
            tree_leaves(state.trace),
            lr=lr,
            momentum=momentum_now,
            dampening=dampening_now,
            nesterov=nesterov,
            weight_decay=decay,
            first_step=done == 0,
        )
        return _like(spec, new_params), TraceState(state.count + 1, _like(spec, buffers))

    return GradientTransformation(
        init, update, update_and_apply if learning_rate is not None else None
    )


class ScaleByAdamState(NamedTuple):
    """Adam's step count and moments; ``nu_max`` is AMSGrad's running max (``None``
    without AMSGrad, so it holds no tensors)."""

    count: Tensor
    mu: PyTree
    nu: PyTree
    nu_max: PyTree = None


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    amsgrad: bool = False,
    *,
    learning_rate: ScalarOrSchedule | None = None,
    decoupled_weight_decay: float = 0.0,
) -> GradientTransformation:
    """Adam's direction as ``torch.optim.Adam`` computes it, before the learning rate.

    ``m / bc1 / (sqrt(v) / sqrt(bc2) + eps)`` with ``bc_i = 1 - b_i ** step``: eps is
    added *after* the bias correction of ``v``, as torch does (optax adds it before).
    With ``amsgrad`` the running maximum of ``v`` (not bias-corrected, like torch's
    ``max_exp_avg_sq``) replaces ``v`` in the denominator.

    Args:
        b1, b2: the moment decay rates (torch's ``betas``).
        eps: added to the denominator.
        amsgrad: use the AMSGrad variant.
        learning_rate: when given, the stage emits the whole update
            ``(-lr / bc1 * m) / denom`` in torch's order of rounding (``addcdiv``), so the
            trajectory is bit-for-bit ``torch.optim.Adam``'s, not just close: float32
            training through max-pool ties or saturated units otherwise amplifies a last-bit
            difference. It also gives the stage a fused ``update_and_apply``. Pair it with
            :func:`track_learning_rate` to keep the lr readable.
        decoupled_weight_decay: AdamW's decay ``p * (1 - lr * wd)`` (needs
            ``learning_rate``); ``update_and_apply`` applies it exactly as torch does,
            ``update`` as the additive update ``-lr * wd * p``.

    Returns:
        A transformation whose state is a :class:`ScaleByAdamState`.

    Example:
        >>> import torch
        >>> t = scale_by_adam()
        >>> p = {"w": torch.zeros(2)}
        >>> t.update({"w": torch.tensor([3.0, -0.5])}, t.init(p))[0]["w"]
        tensor([ 1.0000, -1.0000])
    """
    if learning_rate is None and (_injected(decoupled_weight_decay) or decoupled_weight_decay):
        raise ValueError("decoupled_weight_decay needs the learning_rate in the same stage")

    def init(params: PyTree) -> ScaleByAdamState:
        zeros = tree_map(torch.zeros_like, params)
        nu_max = tree_map(torch.zeros_like, params) if amsgrad else None
        return ScaleByAdamState(
            zero_count(params), zeros, tree_map(torch.zeros_like, params), nu_max
        )

    def moments(grads: list[Tensor], state: ScaleByAdamState):
        """New ``mu``, ``nu``, ``nu_max`` leaves and ``sqrt(nu)`` (a fresh temporary)."""
        if _injected(b1, b2):
            # Tensor betas: b * m + (1 - b) * g in tensor kernels (lerp and addcmul would
            # read them as Python numbers); last-bit rounding apart from the float form.
            mu = torch._foreach_mul(tree_leaves(state.mu), _as_dtype(b1, grads))
            torch._foreach_add_(mu, torch._foreach_mul(grads, _as_dtype(1.0 - b1, grads)))
            nu = torch._foreach_mul(tree_leaves(state.nu), _as_dtype(b2, grads))
            squares = torch._foreach_mul(grads, grads)
            torch._foreach_mul_(squares, _as_dtype(1.0 - b2, grads))
            torch._foreach_add_(nu, squares)
        else:
            mu = torch._foreach_lerp(tree_leaves(state.mu), grads, 1.0 - b1)
            nu = torch._foreach_mul(tree_leaves(state.nu), b2)
            torch._foreach_addcmul_(nu, grads, grads, value=1.0 - b2)
        nu_max = torch._foreach_maximum(tree_leaves(state.nu_max), nu) if amsgrad else None
        return mu, nu, nu_max, torch._foreach_sqrt(nu_max if amsgrad else nu)

    def new_state(count: Tensor, spec: optree.PyTreeSpec, mu, nu, nu_max) -> ScaleByAdamState:
        return ScaleByAdamState(
            count, _like(spec, mu), _like(spec, nu), _like(spec, nu_max) if amsgrad else None
        )

    def update(updates: PyTree, state: ScaleByAdamState, params: PyTree | None = None):
        count = state.count + 1
        grads, spec = _flatten(updates)
        if not grads:
            return updates, ScaleByAdamState(count, state.mu, state.nu, state.nu_max)
        # Bias corrections in float64, as torch computes them in Python floats.
        step = count.to(torch.float64)
        mu, nu, nu_max, denom = moments(grads, state)
        torch._foreach_div_(denom, torch.sqrt(1.0 - b2**step).to(grads[0].dtype))
        torch._foreach_add_(denom, eps)
        if learning_rate is None:
            # torch divides by step_size = lr / bc1; the lr comes in a later stage here.
            torch._foreach_mul_(denom, (1.0 - b1**step).to(grads[0].dtype))
            direction = torch._foreach_div(mu, denom)
        else:
            # torch's addcdiv: (step_size * m) / denom with step_size = -(lr / bc1) in float64.
            lr = learning_rate_at(learning_rate, state.count)
            step_size = ((lr / (1.0 - b1**step)) * -1.0).to(grads[0].dtype)
            direction = torch._foreach_mul(mu, step_size)
            torch._foreach_div_(direction, denom)
            if _injected(decoupled_weight_decay) or decoupled_weight_decay:
                if params is None:
                    raise ValueError("weight decay needs params: call update(grads, state, params)")
                # 0 - lr * wd, not -(lr * wd): at lr 0 the factor is +0.0, so a -0.0
                # param's decay is -0.0 and the sum keeps the direction's sign, as torch's
                # p * (1 - lr * wd) keeps the param's.
                decay = (0.0 - lr * decoupled_weight_decay).to(grads[0].dtype)
                decays = torch._foreach_mul(spec.flatten_up_to(params), decay)
                torch._foreach_add_(direction, decays)
        return _like(spec, direction), new_state(count, spec, mu, nu, nu_max)

    def update_and_apply(updates: PyTree, state: ScaleByAdamState, params: PyTree):
        read = (state.mu, state.nu, state.nu_max) if amsgrad else (state.mu, state.nu)
        grads, spec, base, lr = _fast_path_inputs(updates, state, params, learning_rate, read)
        hyper = (state.count, b1, b2, decoupled_weight_decay)
        numbers = _host_numbers(*hyper) if lr is not None else None
        if numbers is None:
            return update_then_apply(update, updates, state, params)
        done, beta1, beta2, decay = numbers
        new_params, mu, nu, nu_max = fused.adam(
            base,
            grads,
            tree_leaves(state.mu),
            tree_leaves(state.nu),
            tree_leaves(state.nu_max) if amsgrad else None,
            b1=beta1,
            b2=beta2,
            eps=eps,
            lr=lr,
            step=done + 1,
            weight_decay=decay,
        )
        return _like(spec, new_params), new_state(state.count + 1, spec, mu, nu, nu_max)

    return GradientTransformation(
        init, update, update_and_apply if learning_rate is not None else None
    )


def _quotient(
    grads: list[Tensor], denom: list[Tensor], learning_rate: ScalarOrSchedule | None, count
) -> list[Tensor]:
    """``g / denom``, or with a learning rate the whole update ``(-lr * g) / denom``: the
    numerator first, as torch's RMSprop (``addcdiv``) and Adagrad (``g * -clr``) round it."""
    if learning_rate is None:
        return torch._foreach_div(grads, denom)
    direction = torch._foreach_mul(grads, _as_dtype(-learning_rate_at(learning_rate, count), grads))
    torch._foreach_div_(direction, denom)
    return direction


class ScaleByRmsState(NamedTuple):
    """RMSprop's running mean of squared gradients and, when centered, of gradients
    (``None`` otherwise, so it holds no tensors); ``count`` only when the stage holds a
    learning rate."""

    square_avg: PyTree
    grad_avg: PyTree = None
    count: Tensor | None = None


def scale_by_rms(
    alpha: float = 0.99,
    eps: float = 1e-8,
    centered: bool = False,
    *,
    learning_rate: ScalarOrSchedule | None = None,
) -> GradientTransformation:
    """RMSprop's direction ``g / (sqrt(v) + eps)`` as ``torch.optim.RMSprop`` computes it.

    ``v = alpha * v + (1 - alpha) * g * g`` from zeros, with no bias correction. When
    ``centered``, ``v - mean(g) ** 2`` replaces ``v`` (``mean(g)`` is the same running
    average of the gradient). Momentum is a :func:`trace` after this stage.

    Args:
        alpha: the smoothing constant.
        eps: added to the denominator after the square root.
        centered: normalise by the estimated variance instead of the second moment.
        learning_rate: when given, the stage emits the whole update ``(-lr * g) / avg`` in
            torch's order of rounding and has a fused ``update_and_apply`` (RMSprop without
            momentum); pair it with :func:`track_learning_rate`.

    Returns:
        A transformation whose state is a :class:`ScaleByRmsState`.

    Example:
        >>> import torch
        >>> t = scale_by_rms(alpha=0.75)
        >>> p = {"w": torch.zeros(1)}
        >>> t.update({"w": torch.tensor([4.0])}, t.init(p))[0]
        {'w': tensor([2.])}
    """
    counted = learning_rate is not None

    def init(params: PyTree) -> ScaleByRmsState:
        grad_avg = tree_map(torch.zeros_like, params) if centered else None
        count = zero_count(params) if counted else None
        return ScaleByRmsState(tree_map(torch.zeros_like, params), grad_avg, count)

    def averages(grads: list[Tensor], state: ScaleByRmsState, spec: optree.PyTreeSpec):
        """The new state and the denominator ``avg`` (a fresh temporary)."""
        square_avg = torch._foreach_mul(tree_leaves(state.square_avg), alpha)
        torch._foreach_addcmul_(square_avg, grads, grads, value=1.0 - alpha)
        grad_avg = None
        if centered:
            grad_avg = torch._foreach_lerp(tree_leaves(state.grad_avg), grads, 1.0 - alpha)
            avg = torch._foreach_addcmul(square_avg, grad_avg, grad_avg, value=-1.0)
            torch._foreach_sqrt_(avg)
        else:
            avg = torch._foreach_sqrt(square_avg)
        torch._foreach_add_(avg, eps)
        count = state.count + 1 if counted else None
        new_state = ScaleByRmsState(
            _like(spec, square_avg), _like(spec, grad_avg) if centered else None, count
        )
        return new_state, avg

    def update(updates: PyTree, state: ScaleByRmsState, params: PyTree | None = None):
        grads, spec = _flatten(updates)
        if not grads:
            return updates, state._replace(count=state.count + 1) if counted else state
        new_state, avg = averages(grads, state, spec)
        direction = _quotient(grads, avg, learning_rate, state.count)
        return _like(spec, direction), new_state

    def update_and_apply(updates: PyTree, state: ScaleByRmsState, params: PyTree):
        read = (state.square_avg, state.grad_avg) if centered else (state.square_avg,)
        grads, spec, base, lr = _fast_path_inputs(updates, state, params, learning_rate, read)
        if lr is None:
            return update_then_apply(update, updates, state, params)
        grad_avg = tree_leaves(state.grad_avg) if centered else None
        new_params, square_avg, grad_avg = fused.rmsprop(
            base, grads, tree_leaves(state.square_avg), grad_avg, alpha=alpha, eps=eps, lr=lr
        )
        new_state = ScaleByRmsState(
            _like(spec, square_avg), _like(spec, grad_avg) if centered else None, state.count + 1
        )
        return _like(spec, new_params), new_state

    return GradientTransformation(init, update, update_and_apply if counted else None)


class ScaleByRssState(NamedTuple):
    """Adagrad's running sum of squared gradients; ``count`` only when the stage holds a
    learning rate."""

    sum_of_squares: PyTree
    count: Tensor | None = None


def scale_by_rss(
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    learning_rate: ScalarOrSchedule | None = None,
) -> GradientTransformation:
    """Adagrad's direction ``g / (sqrt(sum g*g) + eps)`` as ``torch.optim.Adagrad`` has it.

    Args:
        initial_accumulator_value: the starting value of the sum.
        eps: added to the denominator after the square root.
        learning_rate: when given, the stage emits the whole update ``(g * -lr) / std`` in
            torch's order of rounding and has a fused ``update_and_apply``; Adagrad's
            ``lr_decay`` is a schedule here. Pair it with :func:`track_learning_rate`.

    Returns:
        A transformation whose state is a :class:`ScaleByRssState`.

    Example:
        >>> import torch
        >>> t = scale_by_rss()
        >>> p = {"w": torch.zeros(1)}
        >>> t.update({"w": torch.tensor([-3.0])}, t.init(p))[0]
        {'w': tensor([-1.])}
    """
    counted = learning_rate is not None

    def init(params: PyTree) -> ScaleByRssState:
        total = tree_map(lambda p: torch.full_like(p, initial_accumulator_value), params)
        return ScaleByRssState(total, zero_count(params) if counted else None)

    def sums(grads: list[Tensor], state: ScaleByRssState, spec: optree.PyTreeSpec):
        """The new state and the denominator ``std`` (a fresh temporary)."""
        total = torch._foreach_addcmul(tree_leaves(state.sum_of_squares), grads, grads, value=1.0)
        std = torch._foreach_sqrt(total)
        torch._foreach_add_(std, eps)
        return ScaleByRssState(_like(spec, total), state.count + 1 if counted else None), std

    def update(updates: PyTree, state: ScaleByRssState, params: PyTree | None = None):
        grads, spec = _flatten(updates)
        if not grads:
            return updates, state._replace(count=state.count + 1) if counted else state
        new_state, std = sums(grads, state, spec)
        return _like(spec, _quotient(grads, std, learning_rate, state.count)), new_state

    def update_and_apply(updates: PyTree, state: ScaleByRssState, params: PyTree):
        read = (state.sum_of_squares,)
        grads, spec, base, lr = _fast_path_inputs(updates, state, params, learning_rate, read)
        if lr is None:
            return update_then_apply(update, updates, state, params)
        new_params, total = fused.adagrad(
            base, grads, tree_leaves(state.sum_of_squares), eps=eps, lr=lr
        )
        return _like(spec, new_params), ScaleByRssState(_like(spec, total), state.count + 1)

    return GradientTransformation(init, update, update_and_apply if counted else None)


class ScaleByScheduleState(NamedTuple):
    """The number of steps taken, the argument of the schedule."""

    count: Tensor


def _as_dtype(value: Tensor, updates: list[Tensor]) -> Tensor:
    return value.to(updates[0].dtype)


def scale_by_schedule(schedule: Schedule) -> GradientTransformation:
    """Multiply updates by ``schedule(step)`` (step 0 on the first update).

    Adagrad's ``lr_decay`` is this stage with ``step -> 1 / (1 + step * lr_decay)``.

    Example:
        >>> import torch
        >>> t = scale_by_schedule(lambda step: 0.5 ** step.double())
        >>> p = {"w": torch.ones(1)}
        >>> u, s = t.update(p, t.init(p))
        >>> t.update(p, s)[0]
        {'w': tensor([0.5000])}
    """

    def init(params: PyTree) -> ScaleByScheduleState:
        return ScaleByScheduleState(zero_count(params))

    def update(updates: PyTree, state: ScaleByScheduleState, params: PyTree | None = None):
        grads, spec = _flatten(updates)
        new_state = ScaleByScheduleState(state.count + 1)
        if not grads:
            return updates, new_state
        factor = _as_dtype(torch.as_tensor(schedule(state.count)), grads)
        return _like(spec, torch._foreach_mul(grads, factor)), new_state

    return GradientTransformation(init, update)


class ScaleByLearningRateState(NamedTuple):
    """The number of steps taken and the learning rate the *next* step will use.

    ``lr`` is what a torch loop reads as ``optimizer.param_groups[0]['lr']`` after
    ``scheduler.step()``; :func:`current_lr` finds it in any optimiser state.
    """

    count: Tensor
    lr: Tensor


def _advance(
    state: ScaleByLearningRateState, learning_rate: ScalarOrSchedule
) -> ScaleByLearningRateState:
    """The learning-rate state after one more step."""
    count = state.count + 1
    next_lr = learning_rate_at(learning_rate, count) if callable(learning_rate) else state.lr
    return ScaleByLearningRateState(count, next_lr)


def _fast_path_inputs(
    updates: PyTree,
    state: NamedTuple,
    params: PyTree,
    learning_rate: ScalarOrSchedule,
    kernel_state: tuple[PyTree, ...] | None = None,
) -> tuple[list[Tensor], optree.PyTreeSpec, list[Tensor], float | None]:
    """What a fused ``update_and_apply`` starts from: the update and param leaves, their
    structure, and the lr at ``state.count`` as a Python number, which is ``None`` where the
    fast path may not run (see :mod:`.fast_path`).

    ``kernel_state``: the state trees a :mod:`.fused` CPU step reads leaf by leaf with the
    params, or ``None`` for a stage whose fast path is ``foreach`` kernels (any device)."""
    grads, spec = _flatten(updates)
    if not grads:  # a group with nothing to train (all frozen): the update path is a no-op
        return grads, spec, [], None
    base = spec.flatten_up_to(params)
    # The checks come before reading any number: a read would break a graph under compile.
    columns = [tree_leaves(tree) for tree in kernel_state or ()]
    if kernel_state is not None and not fused.runs_on(base, grads, *columns):
        return grads, spec, base, None
    if not eager_leaves(grads, base, tree_leaves(state), *columns):
        return grads, spec, base, None
    lr = learning_rate_at(learning_rate, state.count) if callable(learning_rate) else learning_rate
    return grads, spec, base, host_number(lr)


def track_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """Keep the learning rate in the state (for :func:`current_lr`) and pass updates through.

    For optimisers whose lr is folded into an earlier stage (``scale_by_adam(...,
    learning_rate=lr)``); the state is a :class:`ScaleByLearningRateState` like
    :func:`scale_by_learning_rate`'s, so checkpoints and ``current_lr`` see no difference.

    Example:
        >>> import torch
        >>> t = track_learning_rate(0.1)
        >>> p = {"w": torch.ones(1)}
        >>> u, s = t.update(p, t.init(p))
        >>> u["w"], float(current_lr(s))
        (tensor([1.]), 0.1)
    """

    def init(params: PyTree) -> ScaleByLearningRateState:
        count = zero_count(params)
        return ScaleByLearningRateState(count, learning_rate_at(learning_rate, count))

    def update(updates: PyTree, state: ScaleByLearningRateState, params: PyTree | None = None):
        count = state.count + 1
        next_lr = learning_rate_at(learning_rate, count) if callable(learning_rate) else state.lr
        return updates, ScaleByLearningRateState(count, next_lr)

    return GradientTransformation(init, update)


def scale_by_learning_rate(learning_rate: ScalarOrSchedule) -> GradientTransformation:
    """Multiply by ``-learning_rate`` (a float, or a schedule of the step count).

    Args:
        learning_rate: a float, or a schedule ``step -> lr`` (see
            :mod:`functorch_diary.optim.schedules`), evaluated at 0, 1, 2, ...

    Returns:
        A transformation whose state is a :class:`ScaleByLearningRateState`.

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> t = scale_by_learning_rate(optim.step_lr(0.1, step_size=1, gamma=0.5))
        >>> p = {"w": torch.ones(1)}
        >>> u, s = t.update(p, t.init(p))
        >>> u["w"], float(current_lr(s))
        (tensor([-0.1000]), 0.05)
    """

    def init(params: PyTree) -> ScaleByLearningRateState:
        count = zero_count(params)
        return ScaleByLearningRateState(count, learning_rate_at(learning_rate, count))

    def update(updates: PyTree, state: ScaleByLearningRateState, params: PyTree | None = None):
        grads, spec = _flatten(updates)
        if not grads:
            return updates, _advance(state, learning_rate)
        # A constant lr stays a Python float: the cheapest foreach overload. A schedule is
        # read at this step, as the fused path reads it (not state.lr, which an
        # inject_hyperparams lr set since the last step would leave one step behind).
        lr_now = learning_rate_at(learning_rate, state.count) if callable(learning_rate) else None
        factor = _as_dtype(-lr_now, grads) if lr_now is not None else -learning_rate
        return _like(spec, torch._foreach_mul(grads, factor)), _advance(state, learning_rate)

    def update_and_apply(updates: PyTree, state: ScaleByLearningRateState, params: PyTree):
        grads, spec, base, lr = _fast_path_inputs(updates, state, params, learning_rate)
        if lr is None:
            return update_then_apply(update, updates, state, params)
        # torch.optim.SGD's last kernel: params + (-lr) * updates, one pass.
        new_params = torch._foreach_add(base, grads, alpha=-lr)
        return _like(spec, new_params), _advance(state, learning_rate)

    return GradientTransformation(init, update, update_and_apply)


def current_lr(opt_state: PyTree, group: str | None = None) -> Tensor:
    """The learning rate the next update will use, read from an optimiser state.

    The functional ``optimizer.param_groups[0]['lr']``: the first
    :class:`ScaleByLearningRateState` found in ``opt_state`` (in its canonical order), or
    the one of parameter group ``group`` of a :func:`~functorch_diary.optim.multi_transform`.

    Args:
        opt_state: any optimiser state.
        group: the label of a ``multi_transform`` group, or ``None`` for the first lr.

    Returns:
        A 0-dim float64 tensor.

    Raises:
        ValueError: the state holds no learning rate (or no group of that name).

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> opt = optim.sgd(optim.multistep_lr(0.1, milestones=[1], gamma=0.1))
        >>> params = {"w": torch.ones(1)}
        >>> state = opt.init(params)
        >>> float(current_lr(state))
        0.1
        >>> _, state = opt.update(params, state, params)
        >>> float(current_lr(state))
        0.010000000000000002
    """
    injected = _find_injected_lr(opt_state)
    if group is None and injected is not None:
        return injected
    if group is not None:
        for inner_states in _find_groups(opt_state):
            if group in inner_states:
                return current_lr(inner_states[group])
        raise ValueError(f"no parameter group {group!r} in the optimiser state")
    for node in tree_nodes(opt_state, ScaleByLearningRateState):
        return node.lr
    raise ValueError("the optimiser state holds no learning rate (no scale_by_learning_rate stage)")


def _find_injected_lr(opt_state: PyTree) -> Tensor | None:
    # inject_hyperparams states (found by duck typing: this module does not import the
    # optimisers) hold the lr the next update uses; the stage inside holds the last one.
    for node in tree_nodes(opt_state, lambda node: hasattr(node, "hyperparams")):
        if "lr" in node.hyperparams:
            return node.hyperparams["lr"]
    return None


def _find_groups(opt_state: PyTree) -> list[dict]:
    # multi_transform states are found by duck typing so this module need not import masking.
    nodes = tree_nodes(opt_state, lambda node: hasattr(node, "inner_states"))
    return [node.inner_states for node in nodes]
