"""Differentially private SGD's aggregation (Abadi et al. 2016), after
``optax.contrib.differentially_private_aggregate``.

Each example's gradient is clipped to a global L2 norm of at most ``l2_norm_clip``, the
clipped gradients are summed, Gaussian noise of standard deviation
``l2_norm_clip * noise_multiplier`` is added, and the sum is divided by the batch size.
The noise comes from the explicit key in the state (:func:`~functorch_diary.prng.normal`),
never from torch's global generator, so a run is reproducible and its noise can be
re-derived. The per-example gradients come from
:func:`~functorch_diary.func.per_sample_grads` (``vmap(grad)``, no loop);
:func:`make_dp_train_step` wires the two into one training step.

The noise generator is a fast integer hash, not a cryptographic one, and its normals are
cut at about 5.8 standard deviations (:func:`~functorch_diary.prng.normal`): fine for
studying DP training, not a certified mechanism for releasing private models.

Example:
    >>> import torch
    >>> from functorch_diary import optim, prng
    >>> dp = optim.dp_aggregate(l2_norm_clip=1.0, noise_multiplier=0.0, key=prng.key(0))
    >>> per_example = {"w": torch.tensor([[3.0, 4.0], [0.3, 0.4]])}  # norms 5 and 0.5
    >>> dp.update(per_example, dp.init({"w": torch.zeros(2)}))[0]["w"]
    tensor([0.4500, 0.6000])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any, NamedTuple

import optree
import torch
from torch import Tensor

from .. import prng
from ..tree import PyTree, tree_flatten_with_paths
from .base import GradientTransformation, apply_updates, per_example_stage
from .shards import active as sharded_step_running

if TYPE_CHECKING:
    from ..model.core import Model
    from ..training.step import LossFn, TrainState

__all__ = ["DPAggregateState", "dp_aggregate", "dp_noise_key", "make_dp_train_step"]


class DPAggregateState(NamedTuple):
    """The base key of the noise and the number of aggregations done so far."""

    key: Tensor
    count: Tensor


def dp_noise_key(state: DPAggregateState, leaf_index: int) -> Tensor:
    """The key of the noise the next update adds to leaf ``leaf_index`` (canonical leaf
    order): ``fold_in(fold_in(key, count), leaf_index)``."""
    return prng.fold_in(prng.fold_in(state.key, state.count), leaf_index)


def dp_aggregate(
    l2_norm_clip: float, noise_multiplier: float, key: int | Tensor
) -> GradientTransformation:
    """``optax.contrib.differentially_private_aggregate(l2_norm_clip, noise_multiplier, seed)``.

    Args:
        l2_norm_clip: the largest L2 norm (over all leaves) one example's gradient may have.
        noise_multiplier: the noise's standard deviation in units of ``l2_norm_clip``.
        key: a :func:`~functorch_diary.prng.key` (or an int seed) for the noise.

    Returns:
        A transformation whose ``update`` takes per-example gradients (every leaf with the
        batch as its leading axis, as :func:`~functorch_diary.func.per_sample_grads` gives)
        and returns ``(sum of clipped gradients + noise) / batch``, shaped like the params:
        chain the optimiser after it. Its state is a :class:`DPAggregateState`.

    Raises:
        ValueError: ``l2_norm_clip <= 0`` or ``noise_multiplier < 0``; in ``update``, a
            leaf without the common leading batch axis (the message names it).
    """
    if l2_norm_clip <= 0 or noise_multiplier < 0:
        raise ValueError(
            f"dp_aggregate needs l2_norm_clip > 0 and noise_multiplier >= 0, got "
            f"{l2_norm_clip} and {noise_multiplier}"
        )
    noise_std = l2_norm_clip * noise_multiplier

    def init(params: PyTree) -> DPAggregateState:
        leaves = optree.tree_leaves(params, none_is_leaf=False)
        device = leaves[0].device if leaves else None
        return DPAggregateState(
            prng.key(key, device=device), torch.zeros((), dtype=torch.int64, device=device)
        )

    def update(updates: PyTree, state: DPAggregateState, params: PyTree | None = None):
        if sharded_step_running():
            raise ValueError(
                "dp_aggregate clips each example's gradient over all leaves, but the sharded "
                "step computes the batch's gradient, split across ranks; train DP-SGD with "
                "make_dp_train_step in one process"
            )
        entries = tree_flatten_with_paths(updates)
        if not entries:
            return updates, state
        batch = entries[0][1].shape[0] if entries[0][1].dim() > 0 else None
        for path, leaf in entries:
            if leaf.dim() == 0 or leaf.shape[0] != batch:
                raise ValueError(
                    f"dp_aggregate expects per-example gradients with the batch ({batch}) as "
                    f"the leading axis of every leaf; leaf {path!r} has shape {tuple(leaf.shape)}"
                )
        leaves = [leaf for _, leaf in entries]
        norms = torch.linalg.vector_norm(
            torch.stack([g.reshape(batch, -1).norm(dim=1) for g in leaves]), dim=0
        )
        divisors = torch.clamp(norms / l2_norm_clip, min=1.0)
        noised = []
        for index, g in enumerate(leaves):
            clipped_sum = (g / divisors.to(g.dtype).view(-1, *([1] * (g.dim() - 1)))).sum(0)
            noise = prng.normal(dp_noise_key(state, index), clipped_sum.shape, g.dtype)
            noised.append((clipped_sum + noise_std * noise) / batch)
        spec = optree.tree_structure(updates, none_is_leaf=False)
        return optree.tree_unflatten(spec, noised), DPAggregateState(state.key, state.count + 1)

    return per_example_stage(GradientTransformation(init, update))


def make_dp_train_step(
    model: Model, loss_fn: LossFn, optimizer: GradientTransformation
) -> Callable[[TrainState, tuple[Any, Any]], tuple[TrainState, dict[str, Tensor]]]:
    """Build a DP-SGD ``step(train_state, (inputs, targets)) -> (train_state, {"loss"})``.

    Per-example gradients in training mode (example ``i``'s dropout key is
    ``fold_in(fold_in(rng, step), i)``), then ``optimizer``, which must start with
    :func:`dp_aggregate` (``chain(dp_aggregate(...), sgd(...))``): it receives the
    per-example gradients. Initialise the state with
    :func:`~functorch_diary.init_train_state` and the same optimiser. A model with
    BatchNorm is refused: batch statistics mix examples, which DP-SGD cannot allow.

    Example:
        >>> import torch
        >>> from functorch_diary import init_train_state, models, optim, prng
        >>> model = models.mlp(in_features=4, hidden=(8,), num_classes=3)
        >>> opt = optim.chain(optim.dp_aggregate(1.0, 1.1, prng.key(0)), optim.sgd(0.1))
        >>> ts = init_train_state(model, opt, seed=0)
        >>> step = make_dp_train_step(model, torch.nn.functional.cross_entropy, opt)
        >>> ts, metrics = step(ts, (torch.randn(6, 4), torch.randint(0, 3, (6,))))
        >>> int(ts.step), metrics["loss"].shape
        (1, torch.Size([]))
    """
    # Imported here, not at the top: func and training import optim, which imports this.
    from ..func import per_sample_grads
    from ..training.step import TrainState

    grads_of = per_sample_grads(model, loss_fn, train=True)

    def step(ts: TrainState, batch: tuple[Any, Any]) -> tuple[TrainState, dict[str, Tensor]]:
        inputs, targets = batch
        grads, losses = grads_of(
            ts.params, ts.state, inputs, targets, prng.fold_in(ts.rng, ts.step)
        )
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        # Not apply_gradients: its check wants grads shaped like the params, and the
        # optimiser's input is per-example.
        params = apply_updates(ts.params, updates)
        return TrainState(params, ts.state, opt_state, ts.step + 1, ts.rng), {"loss": losses.mean()}

    return step
