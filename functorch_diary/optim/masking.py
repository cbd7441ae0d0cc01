"""Parameter groups and freezing by path selection, after optax's ``multi_transform``.

torch's ``param_groups`` (a different lr or weight decay for the backbone and the head)
and seed 002's three ways to "update only a few nodes" (``lr=0``, zeroed gradients, a
``step()`` that skips the parameter) are one mechanism here: every leaf gets a *label*,
chosen by path with :func:`functorch_diary.tree.select`, and each label has its own
transformation. A transformation only ever sees its own leaves (the others are ``None``
holes), so it keeps state for them alone; a frozen leaf's update is ``-0.0``, which
leaves every value, ``-0.0`` and NaN included, bit-for-bit unchanged under
:func:`~functorch_diary.optim.apply_updates`.

Labels are resolved once per tree structure, eagerly (at ``init``), and remembered, so a
compiled ``update`` sees no Python path matching.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> params = {"backbone.w": torch.ones(2), "head.w": torch.ones(2)}
    >>> opt = optim.freeze(optim.sgd(0.5), "backbone.*")
    >>> grads = {"backbone.w": torch.ones(2), "head.w": torch.ones(2)}
    >>> updates, state = opt.update(grads, opt.init(params), params)
    >>> optim.apply_updates(params, updates)
    {'backbone.w': tensor([1., 1.]), 'head.w': tensor([0.5000, 0.5000])}
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping
from typing import Any, NamedTuple

import optree
import torch
from torch import Tensor

from ..tree import PyTree, Selector, select, tree_flatten_with_paths, tree_leaves
from .base import NO_UPDATE, EmptyState, GradientTransformation, apply_gradients, identity

__all__ = [
    "MultiTransformState",
    "freeze",
    "masked",
    "multi_transform",
    "set_to_zero",
]

#: How leaves get their labels: ``{label: selector}`` (each leaf picked by exactly one),
#: or a function ``(path, leaf) -> label``.
Labels = Mapping[Hashable, Selector] | Callable[[str, Any], Hashable]


class MultiTransformState(NamedTuple):
    """One inner state per label; each covers only the leaves of its label."""

    inner_states: dict[Hashable, Any]


def set_to_zero() -> GradientTransformation:
    """Replace every update by ``-0.0``: ``p + (-0.0)`` is ``p`` bit for bit, even for
    ``p = -0.0`` (where ``+0.0`` would flip the sign bit). Stateless.

    Example:
        >>> import torch
        >>> set_to_zero().update({"w": torch.tensor([5.0])}, EmptyState())[0]
        {'w': tensor([-0.])}
    """

    def update(updates: PyTree, state: EmptyState, params: PyTree | None = None):
        return optree.tree_map(
            lambda u: torch.full_like(u, NO_UPDATE), updates, none_is_leaf=False
        ), state

    # Fused, a frozen leaf is simply the old tensor: nothing is written, nothing copied.
    return GradientTransformation(lambda params: EmptyState(), update, lambda u, s, p: (p, s))


def _structure_key(tree: PyTree) -> Hashable:
    # The project's trees are flat dicts of tensors: their keys (and holes) identify the
    # structure, and dynamo traces this lookup, unlike optree's treespec accessors.
    if isinstance(tree, dict) and all(v is None or isinstance(v, Tensor) for v in tree.values()):
        return ("dict", tuple(tree.keys()), tuple(v is None for v in tree.values()))
    return optree.tree_structure(tree, none_is_leaf=False)


def _resolve(tree: PyTree, labels: Labels, known: list[Hashable]) -> list[Hashable]:
    entries = tree_flatten_with_paths(tree)
    if callable(labels) and not isinstance(labels, Mapping):
        resolved = [labels(path, leaf) for path, leaf in entries]
        for (path, _), label in zip(entries, resolved, strict=True):
            if label not in known:
                raise ValueError(
                    f"leaf {path!r} got label {label!r}, which has no transformation; "
                    f"labels with one: {known}"
                )
        return resolved
    if set(labels) != set(known):
        raise ValueError(
            f"labels {sorted(map(repr, labels))} and transformations "
            f"{sorted(map(repr, known))} must name the same groups"
        )
    masks = {label: tree_leaves(select(tree, spec)) for label, spec in labels.items()}
    resolved = []
    for index, (path, _) in enumerate(entries):
        hits = [label for label, mask in masks.items() if mask[index]]
        if len(hits) != 1:
            which = f"by {hits}" if hits else "by no group"
            raise ValueError(
                f"leaf {path!r} is selected {which}; every leaf needs exactly one of "
                f"{list(labels)} (add a group, e.g. with a predicate for the rest)"
            )
        resolved.append(hits[0])
    return resolved


def multi_transform(
    transforms: Mapping[Hashable, GradientTransformation], labels: Labels
) -> GradientTransformation:
    """A different transformation per group of leaves: torch's ``param_groups``.

    Args:
        transforms: ``{label: transformation}``.
        labels: ``{label: selector}`` where each selector is anything
            :func:`~functorch_diary.tree.select` takes (glob, list of globs, predicate
            ``(path, leaf) -> bool``, mask tree) and every leaf is picked by exactly
            one; or a function ``(path, leaf) -> label``.

    Returns:
        A transformation whose state is a :class:`MultiTransformState`.

    Raises:
        ValueError: a leaf is picked by no group or by several, a label has no
            transformation, or a pattern matches nothing; the message names the path.

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> params = {"features.w": torch.ones(1), "classifier.w": torch.ones(1)}
        >>> opt = multi_transform(
        ...     {"body": optim.sgd(0.01), "head": optim.sgd(0.1)},
        ...     {"body": "features.*", "head": "classifier.*"},
        ... )
        >>> updates, _ = opt.update(params, opt.init(params), params)
        >>> updates
        {'features.w': tensor([-0.0100]), 'classifier.w': tensor([-0.1000])}
    """
    known = list(transforms)
    return _grouped(transforms, lambda tree: _resolve(tree, labels, known))


def _grouped(
    transforms: Mapping[Hashable, GradientTransformation],
    resolve: Callable[[PyTree], list[Hashable]],
) -> GradientTransformation:
    """:func:`multi_transform` given ``resolve(tree) -> [label of each leaf]``."""
    known = list(transforms)
    cache: dict[Hashable, list[Hashable]] = {}

    def labels_of(tree: PyTree) -> list[Hashable]:
        key = _structure_key(tree)
        found = cache.get(key)
        if found is None:
            found = resolve(tree)
            cache[key] = found
        return found

    def split(tree: PyTree, leaf_labels: list[Hashable], label: Hashable) -> PyTree:
        leaves, spec = optree.tree_flatten(tree, none_is_leaf=False)
        return optree.tree_unflatten(
            spec,
            [leaf if tag == label else None for leaf, tag in zip(leaves, leaf_labels, strict=True)],
        )

    def init(params: PyTree) -> MultiTransformState:
        leaf_labels = labels_of(params)
        return MultiTransformState(
            {label: transforms[label].init(split(params, leaf_labels, label)) for label in known}
        )

    def per_group(step: Callable, updates: PyTree, state: MultiTransformState, params):
        """Run ``step(transform, sub_updates, inner_state, sub_params)`` on each group and
        put the results (updates, or new params) back in place."""
        leaf_labels = labels_of(updates)
        leaves, spec = optree.tree_flatten(updates, none_is_leaf=False)
        out: list[Any] = list(leaves)
        new_states = {}
        for label in known:
            sub_params = None if params is None else split(params, leaf_labels, label)
            sub_out, new_states[label] = step(
                transforms[label],
                split(updates, leaf_labels, label),
                state.inner_states[label],
                sub_params,
            )
            results = iter(optree.tree_leaves(sub_out, none_is_leaf=False))
            for index, tag in enumerate(leaf_labels):
                if tag == label:
                    out[index] = next(results)
        return optree.tree_unflatten(spec, out), MultiTransformState(new_states)

    def update(updates: PyTree, state: MultiTransformState, params: PyTree | None = None):
        return per_group(lambda t, *args: t.update(*args), updates, state, params)

    def update_and_apply(updates: PyTree, state: MultiTransformState, params: PyTree):
        # Each group takes its own fused step where it has one (Adam on the head, the
        # frozen backbone left as it is).
        return per_group(apply_gradients, updates, state, params)

    return GradientTransformation(init, update, update_and_apply)


def masked(inner: GradientTransformation, mask: Selector) -> GradientTransformation:
    """Apply ``inner`` only to the selected leaves; the others' updates pass through.

    The unselected leaves get no state from ``inner``. Use it for, e.g., weight decay on
    weights but not on biases and norms (nanoGPT's choice).

    Args:
        inner: the transformation for the selected leaves.
        mask: anything :func:`~functorch_diary.tree.select` takes.

    Returns:
        A transformation whose state is a :class:`MultiTransformState` with groups
        ``True`` (``inner``) and ``False`` (identity).

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> p = {"fc.weight": torch.ones(1), "fc.bias": torch.ones(1)}
        >>> decay = masked(optim.add_decayed_weights(0.5), "*.weight")
        >>> grads = {"fc.weight": torch.zeros(1), "fc.bias": torch.zeros(1)}
        >>> decay.update(grads, decay.init(p), p)[0]
        {'fc.weight': tensor([0.5000]), 'fc.bias': tensor([0.])}
    """
    return _grouped({True: inner, False: identity()}, _flags(mask, True, False))


def _flags(selector: Selector, yes: Hashable, no: Hashable) -> Callable[[PyTree], list[Hashable]]:
    def resolve(tree: PyTree) -> list[Hashable]:
        return [yes if flag else no for flag in tree_leaves(select(tree, selector))]

    return resolve


def freeze(inner: GradientTransformation, frozen: Selector) -> GradientTransformation:
    """Train with ``inner`` and keep the ``frozen`` leaves bit-for-bit unchanged.

    Seed 002's three ways (``lr=0``, zeroed gradients, a step that skips the parameter)
    become this one: the frozen leaves' updates are ``-0.0`` and ``inner`` never sees
    them, so they carry no optimiser state (no momentum, no weight decay).

    Args:
        inner: the optimiser for the trainable leaves.
        frozen: anything :func:`~functorch_diary.tree.select` takes.

    Returns:
        A transformation whose state is a :class:`MultiTransformState` with groups
        ``"trainable"`` and ``"frozen"``.

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> p = {"features.w": torch.ones(1), "fc.w": torch.ones(1)}
        >>> opt = freeze(optim.sgd(0.1, momentum=0.9), "features.*")
        >>> from functorch_diary.tree import tree_paths
        >>> [path for path in tree_paths(opt.init(p)) if "trace" in path]  # fc.w's momentum only
        ['inner_states.trainable.1.trace.fc.w']
    """
    return _grouped(
        {"trainable": inner, "frozen": set_to_zero()}, _flags(frozen, "frozen", "trainable")
    )
