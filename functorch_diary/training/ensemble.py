"""Ensembles: ``k`` independently initialised members stacked leaf by leaf and trained
in one step (one ``vmap`` over the members of the package's step body).

Example:
    >>> import torch
    >>> from torch.nn import functional as F
    >>> from functorch_diary import models, optim
    >>> model = models.mlp(in_features=4, hidden=(8,), num_classes=3)
    >>> ensemble = init_ensemble(model, optim.adam(1e-2), seeds=range(3))
    >>> step = make_ensemble_train_step(model, F.cross_entropy, optim.adam(1e-2))
    >>> ensemble, metrics = step(ensemble, (torch.randn(5, 4), torch.randint(0, 3, (5,))))
    >>> tuple(metrics["loss"].shape)
    (3,)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.func import vmap

from ..model.core import Model, State
from ..optim.base import GradientTransformation
from ..tree import Params, PyTree, tree_leaves, tree_map
from .step import (
    LossFn,
    TrainState,
    apply_step,
    init_train_state,
    loss_objective,
    step_key,
    value_and_grad,
    values_out,
)

__all__ = ["ensemble_apply", "init_ensemble", "make_ensemble_train_step", "stack", "unstack"]


def stack(trees: Sequence[PyTree]) -> PyTree:
    """One tree whose every leaf is ``torch.stack`` of the trees' leaves (member axis 0).

    Example:
        >>> import torch
        >>> stack([{"w": torch.zeros(2)}, {"w": torch.ones(2)}])["w"].shape
        torch.Size([2, 2])
    """
    if not trees:
        raise ValueError("stack needs at least one tree")
    return tree_map(lambda *leaves: torch.stack(leaves), trees[0], *trees[1:])


def unstack(tree: PyTree) -> list[PyTree]:
    """Inverse of :func:`stack`: the list of member trees (views into ``tree``'s leaves).

    A 0-dim leaf is shared by all members (the step counts of an ensemble's
    ``TrainState``) and is given to each of them.

    Example:
        >>> import torch
        >>> [m["w"].tolist() for m in unstack({"w": torch.tensor([[0.0], [1.0]])})]
        [[0.0], [1.0]]
    """
    sizes = {leaf.shape[0] for leaf in tree_leaves(tree) if leaf.dim() > 0}
    if len(sizes) != 1:
        raise ValueError(f"unstack needs leaves with one common leading size, got {sorted(sizes)}")
    (k,) = sizes
    return [tree_map(lambda leaf, i=i: leaf[i] if leaf.dim() > 0 else leaf, tree) for i in range(k)]


def init_ensemble(
    model: Model,
    optimizer: GradientTransformation,
    seeds: Sequence[int],
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> TrainState:
    """A ``TrainState`` of ``len(seeds)`` members, member ``i`` exactly
    ``init_train_state(model, optimizer, seeds[i])``, stacked on a leading axis.

    ``params``, ``state`` (BatchNorm statistics per member) and ``rng`` are stacked;
    ``step`` and ``opt_state`` are the optimiser's over the stacked params, which is the
    per-member state stacked for every element-wise optimiser (SGD, Adam, ...).
    """
    members = [
        init_train_state(model, optimizer, seed, device=device, dtype=dtype) for seed in seeds
    ]
    params = stack([m.params for m in members])
    return TrainState(
        params=params,
        state=stack([m.state for m in members]),
        opt_state=optimizer.init(params),
        step=members[0].step,
        rng=torch.stack([m.rng for m in members]),
    )


def make_ensemble_train_step(
    model: Model,
    loss_fn: LossFn,
    optimizer: GradientTransformation,
    *,
    batch_per_member: bool = False,
) -> Callable[[TrainState, tuple[Any, Any]], tuple[TrainState, dict[str, Tensor]]]:
    """Build ``step(ensemble_state, (inputs, targets)) -> (ensemble_state, {"loss": (k,)})``.

    The forward and backward of all members run as one ``vmap``; member ``i`` gets
    exactly the update ``make_train_step`` gives it alone (dropout key
    ``fold_in(rng_i, step)``, its own BatchNorm statistics).

    The optimiser runs once on the stacked trees: its ``torch._foreach`` kernels have no
    ``vmap`` batching rule, and for an element-wise optimiser (SGD, Adam and every other
    named one except ``adafactor`` and ``muon``) updating the stack is updating each
    member. One that mixes elements of a leaf (Adafactor's factored moments, Muon's
    orthogonalisation, a per-leaf norm) would mix members: don't.

    Args:
        model, loss_fn, optimizer: as for :func:`~functorch_diary.make_train_step`.
        batch_per_member: ``False``: every member sees the same batch; ``True``: inputs
            and targets carry a leading member axis.
    """

    objective = loss_objective(model, loss_fn)

    def member(params: Params, state: State, inputs: Any, targets: Any, key: Tensor):
        return value_and_grad(objective, params, state, inputs, targets, key)

    data_dim = 0 if batch_per_member else None
    grads_of = vmap(member, in_dims=(0, 0, data_dim, data_dim, 0))

    def step(ts: TrainState, batch: tuple[Any, Any]) -> tuple[TrainState, dict[str, Tensor]]:
        inputs, targets = batch
        grads, (loss, (new_state, metrics)) = grads_of(
            ts.params, ts.state, inputs, targets, step_key(ts)
        )
        return apply_step(ts, grads, new_state, optimizer), values_out({"loss": loss, **metrics})

    return step


def ensemble_apply(
    model: Model, params: Params, state: State, *inputs: Any, per_member_inputs: bool = False
) -> Any:
    """Every member's eval-mode outputs, stacked on a leading member axis.

    Example:
        >>> import torch
        >>> from functorch_diary import models
        >>> model = models.mlp(in_features=4, hidden=(8,), num_classes=3)
        >>> members = [model.init(seed) for seed in range(5)]
        >>> params, state = stack([p for p, _ in members]), stack([s for _, s in members])
        >>> ensemble_apply(model, params, state, torch.randn(2, 4)).shape
        torch.Size([5, 2, 3])
    """
    data_dim = 0 if per_member_inputs else None

    def one(p: Params, s: State, *xs: Any) -> Any:
        return model.apply(p, s, *xs, train=False)[0]

    return vmap(one, in_dims=(0, 0, *([data_dim] * len(inputs))))(params, state, *inputs)
