"""The machinery of optimisers written as ``torch.optim``'s ``foreach`` step, line by line.

NAdam, RAdam, Adamax, Adadelta, ASGD, Rprop, Adafactor and Muon each write one function,
``step(grads, params, state, t, lr) -> (new_params, new_state)``, that runs the same
kernels in the same order as torch's ``_multi_tensor_<name>`` (or, where torch has no
``foreach`` step, its single-tensor loop), never writing into its arguments (in plain eager
code it writes in place into tensors it made itself, :func:`then`). :func:`torch_step`
turns it into a :class:`~functorch_diary.optim.GradientTransformation`:

- ``update_and_apply`` (what :func:`~functorch_diary.optim.apply_gradients` runs) returns
  the step's new params: torch's step to the bit;
- ``update`` returns ``new_params - params``, so ``apply_updates`` gives back the same
  params (exactly wherever an update is at most half its param, else to one rounding).

``t`` (the 1-based step) and ``lr`` are Python numbers in plain eager code with the step
count on the CPU, as torch reads them (``_get_value``), which is what makes the bits agree;
under ``torch.compile``, ``torch.func`` transforms or a recording autograd, or with the
count on an accelerator (reading it would synchronise), they are float64 tensors, so a
compiled step never re-traces and the step stays differentiable (then within a few ulps of
torch).
The scalar formulas are written once for both: :func:`where`, :func:`maximum` and
:func:`cast` accept either.

Example:
    >>> import torch
    >>> t, lr = step_numbers(torch.tensor(4), 0.1, [torch.ones(2)])
    >>> t, lr
    (5.0, 0.1)
    >>> float(where(t > 4, 1.0, 0.0))
    1.0
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, Protocol

import optree
import torch
from torch import Tensor

from ..tree import PyTree, tree_leaves
from .base import GradientTransformation, learning_rate_at
from .fast_path import eager_leaves, host_number

__all__ = [
    "Number",
    "StepFn",
    "add_scaled",
    "addcdiv",
    "addcmul",
    "cast",
    "fails",
    "hyperparams_at",
    "lerp",
    "maximum",
    "minimum",
    "scalar_dtype",
    "step_numbers",
    "then",
    "torch_step",
    "where",
]

#: A step-dependent scalar: a Python float in eager code, a 0-dim float64 tensor when traced.
Number = float | Tensor


class StepFn(Protocol):
    def __call__(
        self, grads: list[Tensor], params: list[Tensor], state: Any, t: Number, lr: Number
    ) -> tuple[list[Tensor], Any]: ...


def scalar_dtype() -> torch.dtype:
    """The dtype ``torch.optim`` keeps its scalar state in (``step``, NAdam's ``mu_product``,
    ASGD's ``eta`` and ``mu``): float64 if that is the default dtype, else float32.

    Example:
        >>> scalar_dtype()
        torch.float32
    """
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def step_numbers(
    count: Tensor, learning_rate: float | Callable, *leaf_lists: Sequence[Tensor]
) -> tuple[Number, Number]:
    """``(t, lr)`` for the step after ``count`` steps: Python numbers where the step is plain
    eager code on these leaves (see :mod:`.fast_path`), float64 tensors otherwise.

    Example:
        >>> step_numbers(torch.tensor(0), 0.1, [torch.ones(1, requires_grad=True)])
        (tensor(1., dtype=torch.float64), tensor(0.1000, dtype=torch.float64))
    """
    if eager_leaves([count], *leaf_lists):
        done = host_number(count)
        lr = learning_rate
        if callable(learning_rate):
            lr = host_number(learning_rate_at(learning_rate, count))
        if done is not None and lr is not None:
            return float(done + 1), float(lr)
    return (count + 1).to(torch.float64), learning_rate_at(learning_rate, count)


def hyperparams_at(t: Number, *values: Number) -> tuple[Number, ...]:
    """Hyperparameters as a step reads them: Python numbers in plain eager code (``t`` a
    Python number, see :func:`step_numbers`), where an
    :func:`~functorch_diary.optim.inject_hyperparams` tensor is read as torch reads a
    param group's float (so the step stays torch's to the bit); as they are when traced,
    where a tensor takes tensor kernels (no graph break, no re-trace when it changes).

    Example:
        >>> hyperparams_at(2.0, torch.tensor(0.5, dtype=torch.float64), 0.9)
        (0.5, 0.9)
    """
    if torch.is_tensor(t):
        return values
    return tuple(v.item() if isinstance(v, Tensor) else v for v in values)


def fails(value: Number, check: Callable[[float], bool]) -> bool:
    """Whether a hyperparameter fails torch's argument ``check``. An injected (tensor) value
    is not read here, where a compiled step would branch on it: ``inject_hyperparams``
    runs the checks on the floats it was given.

    Example:
        >>> fails(-1.0, lambda v: v >= 0), fails(torch.tensor(-1.0), lambda v: v >= 0)
        (True, False)
    """
    return not isinstance(value, Tensor) and not check(value)


def lerp(xs: list[Tensor], ys: list[Tensor], weight: Number) -> list[Tensor]:
    """``xs + weight * (ys - xs)`` as ``torch._foreach_lerp``; a tensor ``weight`` is cast
    to each leaf's dtype first.

    Example:
        >>> lerp([torch.zeros(1)], [torch.ones(1)], torch.tensor(0.25, dtype=torch.float64))
        [tensor([0.2500])]
    """
    if not isinstance(weight, Tensor):
        return list(torch._foreach_lerp(xs, ys, weight))
    return [torch.lerp(x, y, weight.to(x.dtype)) for x, y in zip(xs, ys, strict=True)]


def where(condition: bool | Tensor, a: Number, b: Number) -> Number:
    """``a if condition else b``, for Python numbers or tensors (then float64).

    Example:
        >>> where(torch.tensor(3.0) > 5, 1.0, 0.0)
        tensor(0., dtype=torch.float64)
    """
    if isinstance(condition, bool):
        return a if condition else b
    as64 = [torch.as_tensor(x, dtype=torch.float64, device=condition.device) for x in (a, b)]
    return torch.where(condition, *as64)


def maximum(a: Number, b: Number) -> Number:
    """Python's ``max`` of two numbers, or ``torch.maximum`` where either is a tensor.

    Example:
        >>> maximum(1.0, 2.0), maximum(torch.tensor(3.0), 1.0)
        (2.0, tensor(3.))
    """
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return max(a, b)
    return torch.maximum(*torch.broadcast_tensors(*_tensors(a, b)))


def minimum(a: Number, b: Number) -> Number:
    """Python's ``min`` of two numbers, or ``torch.minimum`` where either is a tensor.

    Example:
        >>> minimum(1.0, 2.0), minimum(torch.tensor(3.0), 1.0)
        (1.0, tensor(1.))
    """
    if not isinstance(a, Tensor) and not isinstance(b, Tensor):
        return min(a, b)
    return torch.minimum(*torch.broadcast_tensors(*_tensors(a, b)))


def _tensors(a: Number, b: Number) -> tuple[Tensor, Tensor]:
    like = a if isinstance(a, Tensor) else b
    return tuple(torch.as_tensor(x, dtype=like.dtype, device=like.device) for x in (a, b))


def cast(value: Number, like: Sequence[Tensor]) -> float | list[Tensor]:
    """A scalar argument for a ``torch._foreach_*`` call over ``like``: a Python number as
    it is (the kernel rounds it to each leaf's dtype), a tensor as one 0-dim tensor per leaf
    in that leaf's dtype (so a 0-dim leaf is not promoted to float64).

    Example:
        >>> half = torch.tensor(0.5, dtype=torch.float64)
        >>> cast(0.5, [torch.ones(2)]), cast(half, [torch.ones(2)])
        (0.5, [tensor(0.5000)])
    """
    if not isinstance(value, Tensor):
        return value
    return [value.to(x.dtype) for x in like]


def addcdiv(
    xs: list[Tensor], t1: list[Tensor], t2: list[Tensor], value: Number, own: bool = False
) -> list[Tensor]:
    """``xs + value * t1 / t2`` as torch's ``addcdiv`` rounds it (the product first), as a
    new list (in ``xs`` if ``own``, see :func:`then`); a tensor ``value`` takes the same
    three roundings in separate kernels.

    Example:
        >>> addcdiv([torch.ones(1)], [torch.ones(1)], [torch.full((1,), 4.0)], -1.0)
        [tensor([0.7500])]
    """
    if not isinstance(value, Tensor):
        return then(own, "addcdiv", xs, t1, t2, value=value)
    return list(
        torch._foreach_add(xs, torch._foreach_div(torch._foreach_mul(t1, cast(value, t1)), t2))
    )


def addcmul(xs: list[Tensor], t1: list[Tensor], t2: list[Tensor], value: Number) -> list[Tensor]:
    """``xs + value * t1 * t2``, as torch's ``addcmul`` (see :func:`addcdiv`).

    Example:
        >>> addcmul([torch.ones(1)], [torch.ones(1)], [torch.full((1,), 4.0)], -0.5)
        [tensor([-1.])]
    """
    if not isinstance(value, Tensor):
        return list(torch._foreach_addcmul(xs, t1, t2, value=value))
    return list(
        torch._foreach_add(xs, torch._foreach_mul(torch._foreach_mul(t1, cast(value, t1)), t2))
    )


def add_scaled(xs: list[Tensor], ys: list[Tensor], alpha: Number) -> list[Tensor]:
    """``xs + alpha * ys``, as torch's ``add(..., alpha=)`` (see :func:`addcdiv`).

    Example:
        >>> add_scaled([torch.ones(1)], [torch.ones(1)], -0.25)
        [tensor([0.7500])]
    """
    if not isinstance(alpha, Tensor):
        return list(torch._foreach_add(xs, ys, alpha=alpha))
    return list(torch._foreach_add(xs, torch._foreach_mul(ys, cast(alpha, ys))))


def then(own: bool, op: str, xs: list[Tensor], *args: Any, **kwargs: Any) -> list[Tensor]:
    """``torch._foreach_<op>`` on ``xs``: in place if ``own`` (``xs`` are tensors this step
    made, in plain eager code: one allocation and one pass into fresh memory fewer), else
    out of place (traced code, where no tensor is written to). The same kernel either way,
    so the same bits.

    Example:
        >>> fresh = list(torch._foreach_mul([torch.ones(2)], 2.0))
        >>> then(True, "add", fresh, 1.0) is fresh, fresh
        (True, [tensor([3., 3.])])
    """
    if own:
        getattr(torch, f"_foreach_{op}_")(xs, *args, **kwargs)
        return xs
    return list(getattr(torch, f"_foreach_{op}")(xs, *args, **kwargs))


class _Counted(Protocol):
    count: Tensor

    def _replace(self, **kwargs: Any) -> Any: ...


def torch_step(
    name: str,
    init: Callable[[PyTree], NamedTuple],
    step: StepFn,
    learning_rate: float | Callable,
    check: Callable[[PyTree], None] | None = None,
) -> GradientTransformation:
    """The transformation whose ``update_and_apply`` runs ``step`` and whose ``update`` is
    the difference it makes (see the module docstring).

    Args:
        name: the optimiser's name, for error messages.
        init: ``params -> state``; the state is a NamedTuple with a ``count`` field (the
            steps taken, int64) and trees of buffers shaped like the params.
        step: torch's step, on leaf lists: ``(grads, params, state, t, lr) ->
            (new_params, new_state)``, never writing into its arguments. The state it gets
            holds the buffers as leaf lists in the params' order and it returns them so;
            ``count`` is advanced here.
        learning_rate: a float or a schedule ``step -> lr``.
        check: called with the params (at init and every step) to refuse leaves the
            optimiser cannot take; it raises naming the leaf.

    Returns:
        The transformation.

    Example:
        >>> import torch
        >>> from typing import NamedTuple
        >>> from functorch_diary.optim.base import zero_count
        >>> class State(NamedTuple):
        ...     count: torch.Tensor
        >>> def sgd_step(grads, params, state, t, lr):
        ...     return torch._foreach_add(params, grads, alpha=-lr), state
        >>> opt = torch_step("sgd", lambda p: State(zero_count(p)), sgd_step, 0.5)
        >>> p = {"w": torch.ones(1)}
        >>> opt.update({"w": torch.ones(1)}, opt.init(p), p)[0]
        {'w': tensor([-0.5000])}
    """

    def checked_init(params: PyTree) -> NamedTuple:
        if check is not None:
            check(params)
        return init(params)

    def update_and_apply(updates: PyTree, state: _Counted, params: PyTree):
        if params is None:
            raise ValueError(f"{name} needs params: call update(grads, state, params)")
        if check is not None:
            check(params)
        grads, spec = optree.tree_flatten(updates, none_is_leaf=False)
        count = state.count
        if not grads:
            return params, state._replace(count=count + 1)
        base = spec.flatten_up_to(params)
        buffers = state._replace(
            **{
                field: _leaf_list(spec, getattr(state, field))
                for field in state._fields
                if field != "count"
            }
        )
        t, lr = step_numbers(count, learning_rate, grads, base, tree_leaves(state))
        new_base, new_buffers = step(grads, base, buffers, t, lr)
        new_state = new_buffers._replace(
            **{
                field: _tree_like(spec, getattr(new_buffers, field))
                for field in state._fields
                if field != "count"
            }
        )
        return optree.tree_unflatten(spec, new_base), new_state._replace(count=count + 1)

    def update(updates: PyTree, state: _Counted, params: PyTree | None = None):
        new_params, state = update_and_apply(updates, state, params)
        grads, spec = optree.tree_flatten(updates, none_is_leaf=False)
        if not grads:
            return updates, state
        new, base = spec.flatten_up_to(new_params), spec.flatten_up_to(params)
        return optree.tree_unflatten(spec, torch._foreach_sub(new, base)), state

    return GradientTransformation(checked_init, update, update_and_apply)


def _leaf_list(spec: optree.PyTreeSpec, tree: Any) -> Any:
    """A buffer tree as a list in the params' leaf order (``None`` and tensors stay)."""
    if tree is None or isinstance(tree, Tensor):
        return tree
    return spec.flatten_up_to(tree)


def _tree_like(spec: optree.PyTreeSpec, leaves: Any) -> Any:
    if leaves is None or isinstance(leaves, Tensor):
        return leaves
    return optree.tree_unflatten(spec, list(leaves))
