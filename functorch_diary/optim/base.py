"""The optimiser contract, after optax: a pair of pure functions over pytrees.

``init(params) -> opt_state`` and ``update(grads, opt_state, params) -> (updates,
opt_state)``. ``updates`` are *added* to params by :func:`apply_updates` (so a descent
step carries the minus sign). Optimiser states are NamedTuples of tensors, hence pytrees:
they checkpoint, ``vmap`` and compile like params do.

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

from typing import Any, NamedTuple, Protocol

from ..tree import PyTree, tree_add

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "TransformInitFn",
    "TransformUpdateFn",
    "apply_updates",
    "chain",
    "identity",
]


class TransformInitFn(Protocol):
    def __call__(self, params: PyTree) -> Any: ...


class TransformUpdateFn(Protocol):
    def __call__(
        self, updates: PyTree, state: Any, params: PyTree | None = None
    ) -> tuple[PyTree, Any]: ...


class GradientTransformation(NamedTuple):
    """A pure optimiser (or one stage of one): ``init`` and ``update``."""

    init: TransformInitFn
    update: TransformUpdateFn


class EmptyState(NamedTuple):
    """The state of a stateless transformation."""


def identity() -> GradientTransformation:
    """Leave updates unchanged."""
    return GradientTransformation(lambda params: EmptyState(), lambda u, s, p=None: (u, s))


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

    def update(
        updates: PyTree, state: tuple[Any, ...], params: PyTree | None = None
    ) -> tuple[PyTree, tuple[Any, ...]]:
        if len(state) != len(transforms):
            raise ValueError(
                f"chain of {len(transforms)} transformations got a state of {len(state)} parts; "
                "was it made by this optimiser's init?"
            )
        new_state = []
        for transform, inner in zip(transforms, state, strict=True):
            updates, inner = transform.update(updates, inner, params)
            new_state.append(inner)
        return updates, tuple(new_state)

    return GradientTransformation(init, update)


def apply_updates(params: PyTree, updates: PyTree) -> PyTree:
    """``params + updates``, leaf by leaf, as new tensors (params are not modified)."""
    return tree_add(params, updates)
