"""``TrainState`` and the pure training step built on ``torch.func.grad_and_value``.

The diaries' loop is ``optimizer.zero_grad(); loss.backward(); optimizer.step()`` on
objects that hold hidden state. Here one pure function maps the whole training state
and a batch to the next state and the metrics; nothing is mutated, nothing needs zeroing,
and the same function runs eagerly or as one ``torch.compile`` d graph.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from functorch_diary import Model, optim, init_train_state, make_train_step
    >>> model = Model(lambda: nn.Linear(3, 1))
    >>> ts = init_train_state(model, optim.sgd(lr=0.1), seed=0)
    >>> step = make_train_step(model, nn.functional.mse_loss, optim.sgd(lr=0.1))
    >>> x, y = torch.randn(8, 3), torch.randn(8, 1)
    >>> ts, metrics = step(ts, (x, y))
    >>> int(ts.step), metrics["loss"].shape
    (1, torch.Size([]))
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value

from . import prng
from .functional import Model, State
from .optim.base import GradientTransformation, apply_updates
from .tree import Params, tree_leaves

__all__ = ["TrainState", "init_train_state", "make_train_step", "make_eval_step", "LossFn"]

#: ``loss_fn(outputs, targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
LossFn = Callable[[Any, Any], Tensor]
Batch = tuple[Any, Any]


class TrainState(NamedTuple):
    """Everything a training run carries from step to step; a pytree.

    Attributes:
        params: the trainable tensors, keyed like ``named_parameters()``.
        state: buffers (BatchNorm statistics...), keyed like ``named_buffers()``.
        opt_state: the optimiser's state.
        step: the number of steps taken (0-dim int64 tensor).
        rng: the base :mod:`prng` key; step ``t`` uses ``prng.fold_in(rng, t)``.
    """

    params: Params
    state: State
    opt_state: Any
    step: Tensor
    rng: Tensor


def init_train_state(
    model: Model,
    optimizer: GradientTransformation,
    seed: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    params: Params | None = None,
    state: State | None = None,
) -> TrainState:
    """A fresh ``TrainState``: ``model.init(seed)`` (or the given params/state) and
    ``optimizer.init(params)``; ``seed`` also seeds the dropout key."""
    if params is None or state is None:
        params, state = model.init(seed, device=device, dtype=dtype)
    leaves = tree_leaves(params)
    where = leaves[0].device if leaves else device
    return TrainState(
        params=params,
        state=state,
        opt_state=optimizer.init(params),
        step=torch.zeros((), dtype=torch.int64, device=where),
        rng=prng.key(seed, device=where),
    )


def _on_cuda(ts: TrainState) -> bool:
    return any(leaf.is_cuda for leaf in tree_leaves(ts.params))


def _with_compile_policy(fn: Callable, compile: bool | None, mode: str | None) -> Callable:
    """``fn``, compiled as one graph on first call when ``compile`` says so.

    ``compile=None`` compiles when the params are on CUDA. ``fullgraph=True`` makes a
    graph break an error instead of a silent slowdown.
    """
    compiled: list[Callable] = []

    def run(ts: TrainState, batch: Batch):
        use = _on_cuda(ts) if compile is None else compile
        if not use:
            return fn(ts, batch)
        if not compiled:
            compiled.append(torch.compile(fn, mode=mode, fullgraph=True))
        return compiled[0](ts, batch)

    run.__doc__ = fn.__doc__
    run.__wrapped__ = fn  # the eager function, for tests and debugging
    return run


def make_train_step(
    model: Model,
    loss_fn: LossFn,
    optimizer: GradientTransformation,
    *,
    compile: bool | None = None,
    compile_mode: str | None = None,
) -> Callable[[TrainState, Batch], tuple[TrainState, dict[str, Tensor]]]:
    """Build ``step(train_state, (inputs, targets)) -> (train_state, {"loss": ...})``.

    One call runs forward in training mode, the backward pass through
    ``grad_and_value`` (new BatchNorm state carried out as ``has_aux``), the optimiser
    update, and returns a new ``TrainState``; the one passed in is left as it was.

    Args:
        model: the :class:`Model`.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``.
        optimizer: a :class:`~functorch_diary.optim.GradientTransformation`.
        compile: ``True``/``False`` to force ``torch.compile`` on or off; ``None``
            (default) compiles when the params are on CUDA.
        compile_mode: ``torch.compile``'s mode (``"default"``, ``"reduce-overhead"``,
            ``"max-autotune"``).
    """

    def loss_and_state(params: Params, state: State, inputs: Any, targets: Any, key: Tensor):
        outputs, new_state = model.apply(params, state, inputs, train=True, rng=key)
        return loss_fn(outputs, targets), new_state

    def step(ts: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
        inputs, targets = batch
        key = prng.fold_in(ts.rng, ts.step)
        grads, (loss, new_state) = grad_and_value(loss_and_state, has_aux=True)(
            ts.params, ts.state, inputs, targets, key
        )
        updates, opt_state = optimizer.update(grads, ts.opt_state, ts.params)
        params = apply_updates(ts.params, updates)
        return TrainState(params, new_state, opt_state, ts.step + 1, ts.rng), {"loss": loss}

    return _with_compile_policy(step, compile, compile_mode)


def make_eval_step(
    model: Model,
    loss_fn: LossFn | None = None,
    *,
    compile: bool | None = None,
    compile_mode: str | None = None,
) -> Callable[[TrainState, Batch], tuple[Any, dict[str, Tensor]]]:
    """Build ``eval_step(train_state, (inputs, targets)) -> (outputs, metrics)``.

    The model runs in eval mode (BatchNorm's running statistics, no dropout); ``metrics``
    holds ``"loss"`` when ``loss_fn`` is given. Compilation follows the same policy as
    :func:`make_train_step`, in a separate cache, so alternating train and eval steps
    re-traces neither.
    """

    def eval_step(ts: TrainState, batch: Batch) -> tuple[Any, dict[str, Tensor]]:
        inputs, targets = batch
        outputs, _ = model.apply(ts.params, ts.state, inputs, train=False)
        metrics = {} if loss_fn is None else {"loss": loss_fn(outputs, targets)}
        return outputs, metrics

    return _with_compile_policy(eval_step, compile, compile_mode)
