"""``torch.func`` power tools over ``Model`` s and param pytrees.

The diaries reach for loops, hooks, ``requires_grad_(False)`` and ``retain_graph`` where
a function transformation says the same thing in one line:

- :func:`per_sample_grads`: one gradient per example (``vmap(grad)``), for any model
  and loss, BatchNorm in eval mode and dropout with one key per example included;
- :func:`jvp`, :func:`hvp`, :func:`jacobian`, :func:`ravel` over param pytrees;
- :func:`input_grads` / :func:`saliency` (gradient w.r.t. the inputs) and
  :func:`subset_grads` (gradient w.r.t. the params a :func:`~functorch_diary.tree.select`
  selector picks, the rest frozen: seed 000's ``requires_grad_(False)``).

Example:
    >>> import torch
    >>> from functorch_diary import func, models
    >>> model = models.mlp(in_features=4, hidden=(8,), num_classes=3)
    >>> params, state = model.init(seed=0)
    >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    >>> grads, losses = func.per_sample_grads(model, torch.nn.functional.cross_entropy)(
    ...     params, state, x, y)
    >>> tuple(grads["net.1.weight"].shape), tuple(losses.shape)
    ((5, 8, 4), (5,))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.func import grad, grad_and_value, jacrev, vmap
from torch.func import jvp as _torch_jvp

from . import prng
from .model.core import Model, State
from .training.step import LossFn
from .tree import Params, PyTree, Selector, select, tree_flatten_with_paths, tree_leaves
from .tree import tree_unflatten_like as _unflatten_like

__all__ = [
    "hvp",
    "input_grads",
    "jacobian",
    "jvp",
    "loss_of_params",
    "per_sample_grads",
    "ravel",
    "saliency",
    "subset_grads",
]


def _split(params: Params, wrt: Selector | None) -> tuple[Params, Params]:
    """(differentiated, frozen) flat dicts; ``wrt=None`` differentiates every leaf."""
    if wrt is None:
        return dict(params), {}
    mask = select(params, wrt)
    chosen = {name: leaf for name, leaf in params.items() if mask[name]}
    frozen = {name: leaf for name, leaf in params.items() if not mask[name]}
    return chosen, frozen


def _per_sample_keys(rng: int | Tensor, batch: int, device: torch.device) -> Tensor:
    """``batch`` keys: used as given when ``rng`` is already one key per sample, else
    ``fold_in(key, i)`` for sample ``i``."""
    if isinstance(rng, Tensor) and rng.dim() == 1:
        if rng.shape[0] != batch:
            raise ValueError(f"rng holds {rng.shape[0]} per-sample keys for a batch of {batch}")
        return rng.to(device=device, dtype=torch.int64)
    return prng.fold_in(prng.key(rng, device=device), torch.arange(batch, device=device))


def per_sample_grads(
    model: Model,
    loss_fn: LossFn,
    *,
    train: bool = False,
    chunk_size: int | None = None,
    wrt: Selector | None = None,
) -> Callable[..., tuple[Params, Tensor]]:
    """Build ``f(params, state, inputs, targets, rng=None) -> (grads, losses)``.

    Each example is run as a batch of one, so ``grads[name][i]`` is exactly the gradient
    ``loss_fn(model(inputs[i:i+1]), targets[i:i+1])`` gives, and ``losses[i]`` that loss.
    All examples are computed together by ``vmap(grad)``: no Python loop.

    Args:
        model: the :class:`Model`.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` (called on batches of one).
        train: run in training mode. Dropout then needs ``rng``; a model with state
            (BatchNorm) is refused, since one example's batch statistics are not what a
            training batch uses. ``False``: BatchNorm uses its running statistics.
        chunk_size: examples per vectorised chunk (``vmap``'s ``chunk_size``), to bound
            memory on large batches; ``None`` does the whole batch at once.
        wrt: a :func:`~functorch_diary.tree.select` selector; only those params are
            differentiated (the others are frozen and absent from ``grads``).

    Returns:
        ``f``; ``grads`` has each selected leaf with a leading batch dimension and
        ``losses`` has shape ``(batch,)``. ``rng`` (train mode) is one key, split into
        ``prng.fold_in(key, i)`` for example ``i``, or a tensor of one key per example.
    """
    if train and model.state_specs:
        raise ValueError(
            f"per-sample gradients in training mode would normalise each example with its own "
            f"batch statistics (state: {', '.join(model.state_specs)}); pass train=False to use "
            "the running statistics"
        )

    def one(chosen: Params, frozen: Params, state: State, x: Tensor, y: Tensor, key: Tensor | None):
        outputs, _ = model.apply({**frozen, **chosen}, state, x.unsqueeze(0), train=train, rng=key)
        return loss_fn(outputs, y.unsqueeze(0))

    def per_sample(
        params: Params,
        state: State,
        inputs: Tensor,
        targets: Tensor,
        rng: int | Tensor | None = None,
    ) -> tuple[Params, Tensor]:
        chosen, frozen = _split(params, wrt)
        keys = None
        if train and rng is not None:
            keys = _per_sample_keys(rng, inputs.shape[0], inputs.device)
        in_dims = (None, None, None, 0, 0, None if keys is None else 0)
        return vmap(grad_and_value(one), in_dims=in_dims, chunk_size=chunk_size)(
            chosen, frozen, state, inputs, targets, keys
        )

    return per_sample


def loss_of_params(
    model: Model,
    loss_fn: LossFn,
    state: State,
    inputs: Any,
    targets: Any,
    *,
    train: bool = False,
    rng: int | Tensor | None = None,
) -> Callable[[Params], Tensor]:
    """``params -> loss`` on one fixed batch: the function :func:`hvp`, :func:`jvp` and
    :func:`jacobian` take (the new state is dropped)."""

    def loss(params: Params) -> Tensor:
        outputs, _ = model.apply(params, state, inputs, train=train, rng=rng)
        return loss_fn(outputs, targets)

    return loss


def jvp(fn: Callable[[PyTree], Any], primals: PyTree, tangents: PyTree) -> tuple[Any, Any]:
    """``(fn(primals), d fn(primals) . tangents)`` in one forward pass (forward mode).

    Example:
        >>> import torch
        >>> jvp(lambda p: (p["w"] ** 2).sum(), {"w": torch.tensor([1.0, 2.0])},
        ...     {"w": torch.tensor([1.0, 0.0])})
        (tensor(5.), tensor(2.))
    """
    return _torch_jvp(fn, (primals,), (tangents,))


def hvp(fn: Callable[[PyTree], Tensor], params: PyTree, vector: PyTree) -> PyTree:
    """The Hessian of the scalar ``fn`` at ``params`` times ``vector`` (a tree like
    ``params``), forward-over-reverse: one gradient's cost, no Hessian built.

    Example:
        >>> import torch
        >>> hvp(lambda p: (p["w"] ** 3).sum(), {"w": torch.tensor([1.0, 2.0])},
        ...     {"w": torch.tensor([1.0, 1.0])})
        {'w': tensor([ 6., 12.])}
    """
    return _torch_jvp(grad(fn), (params,), (vector,))[1]


def jacobian(fn: Callable[[PyTree], Tensor], params: PyTree, *, flat: bool = False) -> Any:
    """The full Jacobian of ``fn`` (one tensor output) w.r.t. a param tree.

    Args:
        fn: ``params -> Tensor``.
        params: the point.
        flat: ``False``: a tree like ``params`` whose leaf has shape
            ``out.shape + leaf.shape``; ``True``: one ``(out.numel(), n_params)`` matrix,
            columns in :func:`ravel` order.

    Example:
        >>> import torch
        >>> point = {"a": torch.tensor([2.0]), "b": torch.tensor([3.0])}
        >>> jacobian(lambda p: p["a"] * p["b"], point, flat=True)
        tensor([[3., 2.]])
    """
    jac = jacrev(fn)(params)
    if not flat:
        return jac
    out_numel = fn(params).numel()
    # jacrev returns a dict keyed like params; ravel order is optree's canonical order.
    return torch.cat([leaf.reshape(out_numel, -1) for leaf in tree_leaves(jac)], dim=1)


def ravel(tree: PyTree) -> tuple[Tensor, Callable[[Tensor], PyTree]]:
    """Flatten every leaf into one vector; ``unravel(vector)`` rebuilds the tree.

    Example:
        >>> import torch
        >>> vec, unravel = ravel({"b": torch.zeros(2), "a": torch.ones(1, 2)})
        >>> vec.tolist(), unravel(vec)["a"].shape
        ([1.0, 1.0, 0.0, 0.0], torch.Size([1, 2]))
    """
    entries = tree_flatten_with_paths(tree)
    shapes = [leaf.shape for _, leaf in entries]
    sizes = [leaf.numel() for _, leaf in entries]
    vector = torch.cat([leaf.reshape(-1) for _, leaf in entries]) if entries else torch.zeros(0)

    def unravel(flat: Tensor) -> PyTree:
        if flat.numel() != sum(sizes):
            raise ValueError(f"unravel expects {sum(sizes)} numbers, got {flat.numel()}")
        parts = torch.split(flat, sizes)
        return _unflatten_like(tree, [p.reshape(s) for p, s in zip(parts, shapes, strict=True)])

    return vector, unravel


def input_grads(
    model: Model, loss_fn: LossFn, *, train: bool = False
) -> Callable[..., tuple[Tensor, Tensor]]:
    """Build ``f(params, state, inputs, targets, rng=None) -> (d loss / d inputs, loss)``:
    the functional ``x.requires_grad_(True); loss.backward(); x.grad``."""

    def loss(inputs: Tensor, params: Params, state: State, targets: Any, rng: Any) -> Tensor:
        outputs, _ = model.apply(params, state, inputs, train=train, rng=rng)
        return loss_fn(outputs, targets)

    def f(params: Params, state: State, inputs: Tensor, targets: Any, rng: Any = None):
        return grad_and_value(loss)(inputs, params, state, targets, rng)

    return f


def saliency(
    model: Model, params: Params, state: State, inputs: Tensor, classes: Tensor | None = None
) -> Tensor:
    """The gradient of each example's class score w.r.t. its input (eval mode).

    ``classes=None`` takes each example's top class. Examples do not interact in eval
    mode, so one backward of the summed scores gives every example its own gradient.
    A saliency map is then ``result.abs().amax(dim=1)``.

    Example:
        >>> import torch
        >>> from functorch_diary import models
        >>> model = models.lenet()
        >>> params, state = model.init(seed=0)
        >>> saliency(model, params, state, torch.randn(2, 1, 28, 28)).shape
        torch.Size([2, 1, 28, 28])
    """

    def score(x: Tensor) -> Tensor:
        logits, _ = model.apply(params, state, x, train=False)
        chosen = logits.detach().argmax(dim=1) if classes is None else classes
        return logits.gather(1, chosen.view(-1, 1)).sum()

    return grad(score)(inputs)


def subset_grads(
    model: Model, loss_fn: LossFn, wrt: Selector, *, train: bool = False
) -> Callable[..., tuple[Params, tuple[Tensor, State]]]:
    """Build ``f(params, state, inputs, targets, rng=None) -> (grads, (loss, new_state))``
    where ``grads`` holds only the params ``wrt`` selects; the others are constants.

    This is seed 000's ``p.requires_grad_(False)`` and seed 002's "only update a few
    nodes" with nothing mutated: feed ``grads`` to an optimiser initialised on the same
    subset and merge back with ``{**params, **new_subset}``.

    Example:
        >>> import torch
        >>> from functorch_diary import models
        >>> model = models.mlp(in_features=4, hidden=(8,), num_classes=3)
        >>> params, state = model.init(seed=0)
        >>> f = subset_grads(model, torch.nn.functional.cross_entropy, "net.3.*")
        >>> grads, (loss, _) = f(params, state, torch.randn(5, 4), torch.randint(0, 3, (5,)))
        >>> sorted(grads)
        ['net.3.bias', 'net.3.weight']
    """

    def loss(chosen: Params, frozen: Params, state: State, inputs: Any, targets: Any, rng: Any):
        outputs, new_state = model.apply({**frozen, **chosen}, state, inputs, train=train, rng=rng)
        return loss_fn(outputs, targets), new_state

    def f(params: Params, state: State, inputs: Any, targets: Any, rng: Any = None):
        chosen, frozen = _split(params, wrt)
        grads, (value, new_state) = grad_and_value(loss, has_aux=True)(
            chosen, frozen, state, inputs, targets, rng
        )
        return grads, (value, new_state)

    return f
