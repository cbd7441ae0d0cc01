"""Hyperparameters as state, after optax's ``inject_hyperparams``.

``param_groups[0]['lr'] = 0.01`` between steps is how a torch user changes an lr by hand
(or from a callback, a metric, a search). Here the lr, weight decay, betas, momentum and
dampening of any named optimiser can live as 0-dim float64 tensors in the optimiser
state: read them there, set them with :func:`set_hyperparams`, and a compiled step sees
new values of the same inputs, so it does not recompile (``tests/optim/test_inject.py``
counts it).

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.inject_hyperparams(optim.adamw)(lr=1e-3, weight_decay=0.1)
    >>> state = opt.init({"w": torch.ones(2)})
    >>> sorted(state.hyperparams), float(state.hyperparams["weight_decay"])
    (['betas', 'lr', 'weight_decay'], 0.1)
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from ..model.checks import TreeMismatchError
from ..tree import PyTree, tree_leaves, tree_map, tree_map_nodes
from .base import GradientTransformation, apply_gradients

__all__ = ["INJECTABLE", "InjectHyperparamsState", "inject_hyperparams", "set_hyperparams"]


#: The hyperparameters :func:`inject_hyperparams` keeps as tensors in the state: those of
#: torch's ``param_groups`` that a training loop (or a scheduler cycling momentum) sets.
INJECTABLE = ("lr", "weight_decay", "betas", "momentum", "dampening")


class InjectHyperparamsState(NamedTuple):
    """The injected hyperparameters (``{"lr": tensor, "betas": (tensor, tensor), ...}``,
    0-dim float64) and the optimiser's own state."""

    hyperparams: dict[str, Any]
    inner: Any


def inject_hyperparams(
    make: Callable[..., GradientTransformation],
) -> Callable[..., GradientTransformation]:
    """optax's ``inject_hyperparams``: the ``lr``, ``weight_decay``, ``betas``, ``momentum``
    and ``dampening`` of ``make`` (any named optimiser; those it takes, :data:`INJECTABLE`)
    live as tensors in the optimiser state, where they can be read and set between steps
    (the functional ``param_groups[0]['lr'] = ...``, ``['momentum'] = ...``).

    An injected momentum always keeps a momentum buffer (SGD's and RMSprop's
    ``momentum=0`` then equal torch's buffer-free step to rounding). One difference
    remains: during steps at momentum 0 the buffer holds the last gradient, where torch
    leaves its buffer as it was (or makes none), so a momentum set back above 0 after
    steps at 0 is not torch's step.

    The optimiser is rebuilt around the state's tensors on every update; its stages then
    use only tensor arithmetic on them, so a compiled step takes them as inputs and does
    not re-trace when they change. A schedule given as ``lr`` stays a schedule (not
    injected). Eager on the CPU the fused path still runs, reading them as Python numbers.

    Args:
        make: a named optimiser, e.g. ``optim.adam``.

    Returns:
        A function taking ``make``'s arguments and returning the optimiser, whose state is
        an :class:`InjectHyperparamsState`.

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> opt = optim.inject_hyperparams(optim.sgd)(lr=0.1, momentum=0.9)
        >>> params = {"w": torch.ones(1)}
        >>> state = optim.set_hyperparams(opt.init(params), lr=0.5)
        >>> float(optim.current_lr(state)), opt.update({"w": torch.ones(1)}, state, params)[0]
        (0.5, {'w': tensor([-0.5000])})
    """
    defaults = {
        name: p.default
        for name, p in inspect.signature(make).parameters.items()
        if name in INJECTABLE and p.default is not inspect.Parameter.empty
    }

    def build(**kwargs: Any) -> GradientTransformation:
        make(**kwargs)  # torch's argument checks, on the floats (not repeated on tensors)
        chosen = {**defaults, **kwargs}
        injected = {k: v for k, v in chosen.items() if k in INJECTABLE and not callable(v)}
        static = {k: v for k, v in kwargs.items() if k not in injected}

        def optimiser(hyperparams: dict[str, Any]) -> GradientTransformation:
            args = {**static, **hyperparams}
            if "lr" in hyperparams:  # a constant schedule reading the state's tensor
                lr = hyperparams["lr"]
                args["lr"] = lambda count: lr
            return make(**args)

        def init(params: PyTree) -> InjectHyperparamsState:
            leaves = tree_leaves(params)
            device = leaves[0].device if leaves else None
            hyperparams = tree_map(
                lambda v: torch.tensor(v, dtype=torch.float64, device=device),
                injected,
            )
            return InjectHyperparamsState(hyperparams, optimiser(hyperparams).init(params))

        def check(state: Any) -> None:
            if not isinstance(state, InjectHyperparamsState):
                raise TreeMismatchError(
                    f"inject_hyperparams({make.__name__}) got a {type(state).__name__} state; "
                    "initialise it with this optimiser's init(params)"
                )

        def update(updates: PyTree, state: InjectHyperparamsState, params: PyTree | None = None):
            check(state)
            updates, inner = optimiser(state.hyperparams).update(updates, state.inner, params)
            return updates, InjectHyperparamsState(state.hyperparams, inner)

        def update_and_apply(updates: PyTree, state: InjectHyperparamsState, params: PyTree):
            check(state)
            new_params, inner = apply_gradients(
                optimiser(state.hyperparams), updates, state.inner, params
            )
            return new_params, InjectHyperparamsState(state.hyperparams, inner)

        return GradientTransformation(init, update, update_and_apply)

    return build


def set_hyperparams(opt_state: PyTree, **values: Any) -> PyTree:
    """A new optimiser state whose :func:`inject_hyperparams` values are ``values``
    (``lr=0.01``, ``betas=(0.8, 0.99)``): nothing modified, the tensors keep their dtype
    and device, so a compiled step sees new values, not new inputs.

    Raises:
        ValueError: the state has no injected hyperparameter of that name.

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> state = optim.inject_hyperparams(optim.adam)(lr=1e-3).init({"w": torch.ones(1)})
        >>> float(set_hyperparams(state, lr=1e-4).hyperparams["lr"])
        0.0001
    """
    found = []

    def replace(node: InjectHyperparamsState) -> InjectHyperparamsState:
        found.append(node)
        unknown = set(values) - set(node.hyperparams)
        if unknown:
            raise ValueError(
                f"no injected hyperparameter {sorted(unknown)}; this state injects "
                f"{sorted(node.hyperparams)}"
            )
        new = dict(node.hyperparams)
        for name, value in values.items():
            new[name] = tree_map(
                lambda old, v: torch.as_tensor(v, dtype=old.dtype, device=old.device),
                node.hyperparams[name],
                value,
            )
        return InjectHyperparamsState(new, node.inner)

    new_state = tree_map_nodes(replace, opt_state, InjectHyperparamsState)
    if not found:
        raise ValueError(
            "the optimiser state holds no injected hyperparameters (inject_hyperparams)"
        )
    return new_state
