"""The optimiser contract, after optax: a pair of pure functions over pytrees.

``init(params) -> opt_state`` and ``update(grads, opt_state, params) -> (updates,
opt_state)``. ``updates`` are *added* to params by :func:`apply_updates` (so a descent
step carries the minus sign). Optimiser states are NamedTuples of tensors, hence pytrees:
they checkpoint, ``vmap`` and compile like params do.

A transformation may also carry ``update_and_apply(grads, opt_state, params) ->
(new_params, opt_state)``: the same step with the update folded into the new params, the
way ``torch.optim`` folds it into its last in-place kernel. :func:`apply_gradients` uses it
when present. It exists for eager speed: an out-of-place update costs an extra pass over
memory per step, which the fused form avoids by writing the new params directly, into
tensors it made itself (never into an argument).

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.sgd(lr=0.1)
    >>> params = {"w": torch.tensor([1.0, 2.0])}
    >>> opt_state = opt.init(params)
    >>> updates, opt_state = opt.update({"w": torch.tensor([1.0, 1.0])}, opt_state, params)
    >>> optim.apply_updates(params, updates)
    {'w': tensor([0.9000, 1.9000])}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor

from ..model.checks import LeafSpec, TreeMismatchError, check_leaves
from ..tree import PyTree, tree_add, tree_leaves, tree_map

__all__ = [
    "NO_UPDATE",
    "EmptyState",
    "GradientTransformation",
    "TransformInitFn",
    "TransformUpdateFn",
    "apply_gradients",
    "apply_updates",
    "chain",
    "check_grads",
    "identity",
    "learning_rate_at",
    "per_example_stage",
    "takes_per_example_grads",
    "updates_where",
    "zero_count",
]


class TransformInitFn(Protocol):
    def __call__(self, params: PyTree) -> Any: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: PyTree, state: Any, params: PyTree | None = None
    ) -> tuple[PyTree, Any]: ...


class TransformApplyFn(Protocol):
    def __call__(self, updates: PyTree, state: Any, params: PyTree) -> tuple[PyTree, Any]: ...


class GradientTransformation(NamedTuple):
    """A pure optimiser (or one stage of one): ``init``, ``update`` and, optionally, a
    fused ``update_and_apply`` that returns the new params instead of the updates."""

    init: TransformInitFn
    update: TransformUpdateFn
    update_and_apply: TransformApplyFn | None = None


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def identity() -> GradientTransformation:
    """Leave updates unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda u, s, p=None: (u, s))


def per_example_stage(transform: GradientTransformation) -> GradientTransformation:
    """Mark ``transform`` as taking per-example gradients (a leading batch axis on every
    leaf) and returning ordinary ones: a :func:`chain` checks the gradients after it."""
    transform.update.per_example_grads = True
    return transform


def takes_per_example_grads(transform: GradientTransformation) -> bool:
    """Whether ``transform`` was marked by :func:`per_example_stage`."""
    return getattr(transform.update, "per_example_grads", False)


def chain(*transforms: GradientTransformation) -> GradientTransformation:
    """Run ``transforms`` in order; the state is the tuple of their states.

    Example:
        >>> from functorch_diary import optim
        >>> opt = optim.chain(optim.add_decayed_weights(1e-4), optim.scale_by_learning_rate(0.1))
        >>> len(opt.init({}))
        2
    """

    def init(params: PyTree) -> tuple[Any, ...]:
        return tuple(t.init(params) for t in transforms)

    # The stage state types init makes, found now (not lazily: a compiled step would
    # guard on a closure that changes after its first call).
    made = tuple(_state_type(t) for t in transforms)

    def check_state(state: Any) -> None:
        """A state from another optimiser fails here, naming both, before any stage reads a
        field it does not have."""
        got = tuple(map(type, state)) if isinstance(state, tuple) else (type(state),)
        if len(got) != len(made) or any(
            want is not None and have is not want for have, want in zip(got, made, strict=True)
        ):
            names = ", ".join(t.__name__ if t is not None else "?" for t in made)
            raise TreeMismatchError(
                f"optimiser state: got a state of stages ({', '.join(t.__name__ for t in got)}), "
                f"but this optimiser's init makes ({names}); was it made by another "
                "optimiser's init? Initialise it with this optimiser's init(params)"
            )

    def run(
        stages: tuple[GradientTransformation, ...], updates: PyTree, state: tuple[Any, ...], params
    ) -> tuple[PyTree, list[Any]]:
        check_state(state)
        new_state = []
        # stages may be all but the last transform (update_and_apply runs that one itself).
        for transform, inner in zip(stages, state, strict=False):
            updates, inner = transform.update(updates, inner, params)
            new_state.append(inner)
        return updates, new_state

    def update(
        updates: PyTree, state: tuple[Any, ...], params: PyTree | None = None
    ) -> tuple[PyTree, tuple[Any, ...]]:
        # Called directly (the optax way), update checks what apply_gradients checks; a
        # chain that starts with a per-example stage (DP-SGD) is checked after it.
        per_example = bool(transforms) and takes_per_example_grads(transforms[0])
        if not per_example:
            check_grads(params, updates)
        check_state(state)
        new_state = []
        for index, (transform, inner) in enumerate(zip(transforms, state, strict=True)):
            updates, inner = transform.update(updates, inner, params)
            new_state.append(inner)
            if per_example and index == 0:
                check_grads(params, updates)
        return updates, tuple(new_state)

    def update_and_apply(
        updates: PyTree, state: tuple[Any, ...], params: PyTree
    ) -> tuple[PyTree, tuple[Any, ...]]:
        updates, new_state = run(transforms[:-1], updates, state, params)
        new_params, last_state = transforms[-1].update_and_apply(updates, state[-1], params)
        return new_params, (*new_state, last_state)

    # The chain fuses when its last stage does: the stages before it only shape the updates.
    fused = bool(transforms) and transforms[-1].update_and_apply is not None
    return GradientTransformation(init, update, update_and_apply if fused else None)


def apply_gradients(
    optimizer: GradientTransformation, grads: PyTree, opt_state: Any, params: PyTree
) -> tuple[PyTree, Any]:
    """One optimiser step: ``(new_params, new_opt_state)``, nothing modified.

    Raises:
        TreeMismatchError: a gradient's key, shape, dtype or device does not match its
            param's (even where broadcasting or type promotion would let the step run);
            the message names the leaf.

    The same as ``update`` followed by :func:`apply_updates`, through the optimiser's fused
    ``update_and_apply`` when it has one (the named optimisers do): on the eager CPU path
    that saves passes over memory per step, and it is ``torch.optim``'s step to the bit:
    the ``fused=True`` step for SGD, Adam, AdamW and Adagrad (it runs torch's fused kernels
    on copies), the ``foreach=True`` step for RMSprop without momentum.

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> opt = optim.adam(0.1)
        >>> params = {"w": torch.tensor([1.0, 2.0])}
        >>> params, opt_state = optim.apply_gradients(
        ...     opt, {"w": torch.tensor([1.0, -1.0])}, opt.init(params), params)
        >>> params
        {'w': tensor([0.9000, 2.1000])}
    """
    check_grads(params, grads)
    if optimizer.update_and_apply is not None:
        return optimizer.update_and_apply(grads, opt_state, params)
    return update_then_apply(optimizer.update, grads, opt_state, params)


def _state_type(transform: GradientTransformation) -> type | None:
    """The type of the state ``transform.init`` makes (from an empty tree), or ``None``
    where that cannot be found without params (a mask that must match some leaf)."""
    try:
        return type(transform.init({}))
    except (ValueError, TypeError, KeyError):
        return None


def check_grads(params: PyTree | None, grads: PyTree) -> None:
    """Raise :class:`TreeMismatchError` naming the first gradient whose key, shape, dtype or
    device is not its param's (``params=None``: nothing to check against).

    Checked before a step: broadcasting or type promotion would run it on the wrong tree,
    and a kernel's "size of tensor a (3) must match ..." names no leaf.

    Example:
        >>> import torch
        >>> check_grads({"w": torch.ones(3)}, {"w": torch.ones(1)})
        Traceback (most recent call last):
        ...
        functorch_diary.model.checks.TreeMismatchError: ...
    """
    if params is not None and not _grads_fit(params, grads):
        _check_grads_like(params, grads)


def _grads_fit(params: PyTree, grads: PyTree) -> bool:
    """Whether every gradient has its param's key, shape, dtype and device (flat dicts, the
    project's params; other trees are left to the optimiser). A few attribute reads per
    leaf: cheap enough for every step, where :func:`_check_grads_like` builds messages."""
    if not isinstance(params, Mapping) or not all(isinstance(p, Tensor) for p in params.values()):
        return True
    if not isinstance(grads, Mapping) or grads.keys() != params.keys():
        return False
    return all(
        isinstance(g, Tensor) and g.shape == p.shape and g.dtype == p.dtype and g.device == p.device
        for p, g in ((p, grads[name]) for name, p in params.items())
    )


def _check_grads_like(params: PyTree, grads: PyTree) -> None:
    """Raise :class:`TreeMismatchError` naming the first grads leaf that does not have its
    param's key, shape, dtype or device (flat dicts, the project's params)."""
    if not isinstance(params, Mapping) or not all(isinstance(p, Tensor) for p in params.values()):
        return
    specs = {name: LeafSpec(p.shape, p.dtype) for name, p in params.items()}
    first = next(iter(params.values()), None)
    float_dtype = next((p.dtype for p in params.values() if p.is_floating_point()), None)
    check_leaves(
        "grads",
        grads,
        specs,
        float_dtype=float_dtype,
        device=None if first is None else first.device,
    )


def update_then_apply(
    update: TransformUpdateFn, grads: PyTree, state: Any, params: PyTree
) -> tuple[PyTree, Any]:
    """``update`` then :func:`apply_updates`: the unfused step, and every fused stage's
    fallback where fusing is not possible (under tracing, autograd or ``vmap``)."""
    updates, state = update(grads, state, params)
    return apply_updates(params, updates), state


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates``, leaf by leaf, as new tensors (params are not modified)."""
    return tree_add(params, updates)


#: The update that leaves a param as it is, bit for bit, under :func:`apply_updates`:
#: ``p + (-0.0)`` is ``p`` for every float ``p``, ``-0.0`` and NaN included (``p + 0.0``
#: would turn ``-0.0`` into ``+0.0``). Skipped, frozen and accumulating steps emit it, so
#: ``update`` + ``apply_updates`` keeps such a leaf exactly as ``apply_gradients`` does.
NO_UPDATE = -0.0


def updates_where(condition: Tensor, updates: PyTree) -> PyTree:
    """``updates`` where ``condition`` (a 0-dim bool tensor) holds, else :data:`NO_UPDATE`,
    chosen with ``torch.where`` (no host sync, one graph under compile).

    Example:
        >>> import torch
        >>> p = {"w": torch.tensor([-0.0, 1.0])}
        >>> skipped = updates_where(torch.tensor(False), {"w": torch.tensor([2.0, 2.0])})
        >>> apply_updates(p, skipped)["w"]
        tensor([-0., 1.])
    """
    return tree_map(lambda u: torch.where(condition, u, NO_UPDATE), updates)


def zero_count(params: PyTree) -> Tensor:
    """A step counter at 0 (int64) on the params' device.

    Example:
        >>> import torch
        >>> zero_count({"w": torch.ones(2)})
        tensor(0)
    """
    leaves = tree_leaves(params)
    return torch.zeros((), dtype=torch.int64, device=leaves[0].device if leaves else None)


def learning_rate_at(learning_rate: float | Callable[[Tensor], Tensor], count: Tensor) -> Tensor:
    """The learning rate at step ``count`` as a 0-dim float64 tensor on ``count``'s device
    (a float, a tensor, or a schedule; a Python float keeps its precision).

    Example:
        >>> learning_rate_at(lambda step: 0.5 ** step.double(), torch.tensor(2))
        tensor(0.2500, dtype=torch.float64)
    """
    value = learning_rate(count) if callable(learning_rate) else learning_rate
    if isinstance(value, Tensor):
        return value.to(device=count.device, dtype=torch.float64)
    return torch.tensor(value, dtype=torch.float64, device=count.device)
