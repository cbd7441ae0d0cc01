"""Pytree helpers on optree: tree arithmetic, paths, and one way to select leaves.

Every pytree in functorch-diary (params, state, optimiser state, ``TrainState``) goes
through these functions. Arithmetic runs on ``torch._foreach_*`` kernels, so one call
touches all leaves at once: the functional optimisers cost no more than
``torch.optim(foreach=True)``, and the same ops trace as one graph under ``torch.compile``.

A leaf's *path* is its keys joined by dots. For a params dict the path is the key itself
(``"features.0.weight"``); for a ``TrainState`` it starts with the field name
(``"params.features.0.weight"``).

Example:
    >>> import torch
    >>> from functorch_diary import tree
    >>> params = {"fc.weight": torch.ones(2, 2), "fc.bias": torch.zeros(2)}
    >>> tree.tree_paths(tree.tree_scale(params, 2.0))
    ['fc.bias', 'fc.weight']
    >>> tree.select(params, "*.bias")
    {'fc.weight': False, 'fc.bias': True}
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from typing import Any, Union

import optree
import torch
from torch import Tensor

PyTree = Any
Params = dict[str, Tensor]
Predicate = Callable[[str, Any], bool]
#: What :func:`select` accepts: a glob pattern, several patterns, a predicate on
#: ``(path, leaf)``, or a mask tree of bools with the tree's own structure.
Selector = Union[str, Sequence[str], Predicate, PyTree]  # noqa: UP007 (a runtime alias)

__all__ = [
    "Params",
    "PyTree",
    "Selector",
    "combine",
    "partition",
    "select",
    "tree_add",
    "tree_clone",
    "tree_flatten_with_paths",
    "tree_global_norm",
    "tree_leaves",
    "tree_map",
    "tree_map_nodes",
    "tree_nodes",
    "tree_paths",
    "tree_scale",
    "tree_sub",
    "tree_unflatten_like",
    "tree_where",
    "tree_zeros_like",
]


def tree_map(fn: Callable[..., Any], tree: PyTree, *rest: PyTree) -> PyTree:
    """Apply ``fn`` to every leaf (``None`` is an empty subtree, not a leaf)."""
    return optree.tree_map(fn, tree, *rest, none_is_leaf=False)


def tree_leaves(tree: PyTree) -> list[Any]:
    """The leaves of ``tree`` in optree's canonical (key-sorted) order."""
    return optree.tree_leaves(tree, none_is_leaf=False)


NodeMatch = Union[type, Callable[[Any], bool]]  # noqa: UP007 (a runtime alias)


def _node_matcher(match: NodeMatch) -> Callable[[Any], bool]:
    return (lambda node: isinstance(node, match)) if isinstance(match, type) else match


def tree_nodes(tree: PyTree, match: NodeMatch) -> list[Any]:
    """The subtrees of ``tree`` that ``match`` (a type, or a predicate on a node), outermost
    first and not looked into: how a state of one kind is found in an optimiser state
    (a schedule's inside a chain inside a wrapper).

    Example:
        >>> from typing import NamedTuple
        >>> class Lr(NamedTuple):
        ...     lr: float
        >>> tree_nodes({"a": (Lr(0.1), 3), "b": [Lr(0.2)]}, Lr)
        [Lr(lr=0.1), Lr(lr=0.2)]
    """
    matches = _node_matcher(match)
    nodes = optree.tree_leaves(tree, is_leaf=matches, none_is_leaf=False)
    return [node for node in nodes if matches(node)]


def tree_map_nodes(fn: Callable[[Any], Any], tree: PyTree, match: NodeMatch) -> PyTree:
    """``tree`` with ``fn(node)`` in place of each subtree that ``match`` es (as
    :func:`tree_nodes` finds them), everything else as it is.

    Example:
        >>> from typing import NamedTuple
        >>> class Lr(NamedTuple):
        ...     lr: float
        >>> tree_map_nodes(lambda n: n._replace(lr=n.lr * 10), {"a": (Lr(0.1), 3)}, Lr)
        {'a': (Lr(lr=1.0), 3)}
    """
    matches = _node_matcher(match)
    return optree.tree_map(
        lambda node: fn(node) if matches(node) else node,
        tree,
        is_leaf=matches,
        none_is_leaf=False,
    )


def _entry_name(entry: Any) -> str:
    # Named tuples report their field name; dicts and sequences their key or index.
    field = getattr(entry, "field", None)
    return str(field if isinstance(field, str) else entry.entry)


def tree_flatten_with_paths(tree: PyTree) -> list[tuple[str, Any]]:
    """``[(path, leaf), ...]`` in canonical order, paths joined with dots."""
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=False)
    accessors = optree.treespec_accessors(spec)
    return [
        (".".join(_entry_name(e) for e in acc), leaf)
        for acc, leaf in zip(accessors, leaves, strict=True)
    ]


def tree_paths(tree: PyTree) -> list[str]:
    """The dotted path of every leaf, in canonical order."""
    return [path for path, _ in tree_flatten_with_paths(tree)]


def tree_unflatten_like(tree: PyTree, leaves: Sequence[Any]) -> PyTree:
    """A tree with the structure of ``tree`` and the given leaves (canonical order)."""
    return optree.tree_unflatten(optree.tree_structure(tree, none_is_leaf=False), leaves)


def _foreach(op: Callable[..., list[Tensor]], tree: PyTree, *rest: PyTree, **kwargs: Any) -> PyTree:
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=False)
    if not leaves:
        return tree
    others = [spec.flatten_up_to(other) for other in rest]
    return optree.tree_unflatten(spec, op(leaves, *others, **kwargs))


def tree_add(a: PyTree, b: PyTree, alpha: float = 1.0) -> PyTree:
    """``a + alpha * b`` leaf by leaf (one fused foreach kernel launch)."""
    return _foreach(torch._foreach_add, a, b, alpha=alpha)


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    """``a - b`` leaf by leaf."""
    return _foreach(torch._foreach_sub, a, b)


def tree_scale(tree: PyTree, scalar: float | Tensor) -> PyTree:
    """Every leaf multiplied by ``scalar`` (a number or a 0-dim tensor)."""
    leaves, spec = optree.tree_flatten(tree, none_is_leaf=False)
    return optree.tree_unflatten(spec, torch._foreach_mul(leaves, scalar)) if leaves else tree


def tree_zeros_like(tree: PyTree) -> PyTree:
    """Zeros with each leaf's shape, dtype and device."""
    return tree_map(torch.zeros_like, tree)


def tree_clone(tree: PyTree) -> PyTree:
    """A copy of every tensor leaf, so the result shares no storage with ``tree``."""
    return tree_map(lambda leaf: leaf.clone() if isinstance(leaf, Tensor) else leaf, tree)


def tree_where(condition: Tensor, a: PyTree, b: PyTree) -> PyTree:
    """``torch.where(condition, a_leaf, b_leaf)`` leaf by leaf: a choice made with no host
    sync that keeps the chosen leaves bit for bit (signed zeros included).

    Example:
        >>> import torch
        >>> tree_where(torch.tensor(False), {"w": torch.ones(1)}, {"w": torch.tensor([-0.0])})
        {'w': tensor([-0.])}
    """
    return tree_map(lambda x, y: torch.where(condition, x, y) if isinstance(x, Tensor) else x, a, b)


def tree_global_norm(tree: PyTree) -> Tensor:
    """The L2 norm of all leaves together, as ``torch.nn.utils.clip_grad_norm_`` computes it."""
    leaves = tree_leaves(tree)
    if not leaves:
        return torch.tensor(0.0)
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(leaves)))


def _is_pattern_spec(spec: Any) -> bool:
    return isinstance(spec, str) or (
        isinstance(spec, (list, tuple)) and bool(spec) and all(isinstance(s, str) for s in spec)
    )


def select(tree: PyTree, spec: Selector) -> PyTree:
    """A mask tree of bools: which leaves of ``tree`` the selector picks.

    This is the one path-selection helper of the project: freezing, initialisers,
    weight-decay masks, per-group hyperparameters and partial loading all call it.

    Args:
        tree: any pytree (usually a params dict).
        spec: a glob pattern on the dotted path (``"features.*"``), a list of patterns
            (any may match), a predicate ``(path, leaf) -> bool``, or a mask tree of
            bools with the structure of ``tree``.

    Returns:
        A tree with the structure of ``tree`` and a bool at every leaf.

    Raises:
        ValueError: a pattern matches no leaf (a typo would otherwise silently select
            nothing), or a mask tree's structure differs from ``tree``'s.

    Example:
        >>> import torch
        >>> params = {"features.0.weight": torch.ones(1), "classifier.weight": torch.ones(1)}
        >>> select(params, "features.*")
        {'features.0.weight': True, 'classifier.weight': False}
        >>> select(params, lambda path, leaf: path.startswith("classifier"))
        {'features.0.weight': False, 'classifier.weight': True}
    """
    entries = tree_flatten_with_paths(tree)
    if _is_pattern_spec(spec):
        patterns = [spec] if isinstance(spec, str) else list(spec)
        paths = [path for path, _ in entries]
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(path, pattern) for path in paths):
                shown = ", ".join(paths[:6]) + (", ..." if len(paths) > 6 else "")
                raise ValueError(f"pattern {pattern!r} matches no leaf; paths look like: {shown}")
        flags = [any(fnmatch.fnmatchcase(path, p) for p in patterns) for path in paths]
    elif callable(spec):
        flags = [bool(spec(path, leaf)) for path, leaf in entries]
    else:
        expected = optree.tree_structure(tree, none_is_leaf=False)
        actual = optree.tree_structure(spec, none_is_leaf=False)
        if expected != actual:
            raise ValueError(
                f"mask tree does not match the tree: expected structure {expected}, got {actual}"
            )
        flags = [bool(flag) for flag in optree.tree_leaves(spec, none_is_leaf=False)]
    return tree_unflatten_like(tree, flags)


def partition(tree: PyTree, spec: Selector) -> tuple[PyTree, PyTree]:
    """Split ``tree`` into (selected, rest); each has ``None`` where the other has a leaf.

    ``None`` is an empty subtree, so :func:`tree_map` and the optimisers skip the holes.

    Example:
        >>> import torch
        >>> head, body = partition({"head.w": torch.ones(1), "body.w": torch.ones(1)}, "head.*")
        >>> sorted(k for k, v in head.items() if v is not None)
        ['head.w']
    """
    mask = select(tree, spec)
    chosen = tree_map(lambda keep, leaf: leaf if keep else None, mask, tree)
    rest = tree_map(lambda keep, leaf: None if keep else leaf, mask, tree)
    return chosen, rest


def combine(*trees: PyTree) -> PyTree:
    """Inverse of :func:`partition`: at each position, the first non-``None`` leaf."""

    def first(*leaves: Any) -> Any:
        return next((leaf for leaf in leaves if leaf is not None), None)

    return optree.tree_map(first, *trees, none_is_leaf=True)
