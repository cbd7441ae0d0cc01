"""``TrainState`` and the pure training step built on ``torch.func.grad_and_value``.

The usual loop is ``optimizer.zero_grad(); loss.backward(); optimizer.step()`` on
objects that hold hidden state. Here one pure function maps the whole training state
and a batch to the next state and the metrics; nothing is mutated, nothing needs zeroing,
and the same function runs eagerly or as one ``torch.compile`` d graph.

Every training step of the package (this one, ensembles, data-parallel, sharded and GAN
steps) is built from the same three pieces defined here: :func:`value_and_grad` (the one
gradient path rule), :func:`loss_objective` (forward in training mode plus the loss) and
:func:`apply_step` (the optimiser update that makes the next ``TrainState``). Whatever the
caller passes, what a step returns carries no autograd history (:func:`values_out`).
Compilation follows :mod:`~functorch_diary.training.compile`.

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

import contextlib
import os
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value

from .. import prng
from .._torch import functorch_transform_active
from ..model.checks import check_leaves
from ..model.core import Model, State
from ..optim import fused
from ..optim.base import GradientTransformation, apply_gradients
from ..tree import Params, PyTree, tree_leaves, tree_map, tree_unflatten_like
from .compile import COMPILE_MODES, to_channels_last, with_compile_policy

__all__ = [
    "COMPILE_MODES",
    "LOSS_FORMS",
    "LossFn",
    "LossSees",
    "Metrics",
    "ModelInputs",
    "Objective",
    "TrainState",
    "apply_step",
    "build_step",
    "consuming",
    "donate_into",
    "init_train_state",
    "loss_objective",
    "make_eval_step",
    "make_train_step",
    "step_key",
    "value_and_grad",
    "values_out",
]

#: ``loss_fn(outputs, targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
LossFn = Callable[[Any, Any], Tensor]
#: What a loss function receives (``make_train_step(..., loss_sees=...)``).
LossSees = Literal["outputs, targets", "params, outputs, batch"]
LOSS_FORMS = ("outputs, targets", "params, outputs, batch")
Batch = tuple[Any, Any]
Metrics = dict[str, Tensor]
#: ``objective(params, state, inputs, targets, key) -> (loss, (new_state, metrics))``.
Objective = Callable[[Params, State, Any, Any, Tensor | None], tuple[Tensor, tuple[State, Metrics]]]
_AUTOCAST_DTYPES = (torch.bfloat16, torch.float16)


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
    ``optimizer.init(params)``; ``seed`` also seeds the random key.

    Given ``params`` (e.g. ``dict(net.named_parameters())``) without ``state``, the state
    is the model's initial one (``model.init(seed)``'s, on the params' device and dtype).
    Given leaves are taken as values: detached, so no autograd graph reaches into the
    run (the caller's tensors are not modified).

    Raises:
        TreeMismatchError: ``params`` or ``state`` do not fit the model (names the leaf).
    """
    if params is None:
        params, fresh = model.init(seed, device=device, dtype=dtype)
        state = fresh if state is None else state
    elif state is None:
        float_dtype, where = check_leaves("params", params, model.param_specs)
        _, state = model.init(seed)
        state = {
            name: leaf.to(device=where, dtype=float_dtype if leaf.is_floating_point() else None)
            for name, leaf in state.items()
        }
    params, state = values_out(params), values_out(state)
    leaves = tree_leaves(params)
    where = leaves[0].device if leaves else device
    return TrainState(
        params=params,
        state=state,
        opt_state=optimizer.init(params),
        step=torch.zeros((), dtype=torch.int64, device=where),
        rng=prng.key(seed, device=where),
    )


def _check_options(compile_mode: str | None, autocast_dtype: torch.dtype | None) -> None:
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ValueError(
            f"compile_mode must be None or one of {COMPILE_MODES}, got {compile_mode!r}"
        )
    if autocast_dtype is not None and autocast_dtype not in _AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}"
        )


def _autocast(params: Params, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(tree_leaves(params)[0].device.type, dtype=dtype)


def _eager_autograd_allowed(autocast: bool) -> bool:
    """The one gradient path rule: plain ``torch.autograd.grad`` when eager, outside every
    ``torch.func`` transform and without autocast; ``grad_and_value`` everywhere else."""
    if autocast or torch.compiler.is_compiling():
        return False
    return functorch_transform_active() is False


def values_out(tree: PyTree) -> PyTree:
    """``tree`` with every leaf that carries autograd history detached (a view, no copy).

    A step's results are values: params passed with ``requires_grad=True`` (an
    ``nn.Parameter``) would otherwise chain each step's graph to the last one. Inside a
    ``torch.func`` transform (the gradient *through* a step, as MAML takes it) the leaves
    are left as they are, since the transform needs them.
    """
    if functorch_transform_active():
        return tree

    def detach(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and (leaf.requires_grad or leaf.grad_fn is not None):
            return leaf.detach()
        return leaf

    return tree_map(detach, tree)


def value_and_grad(
    fn: Callable[..., tuple[Tensor, Any]], params: Params, *args: Any, autocast: bool = False
) -> tuple[Params, tuple[Tensor, Any]]:
    """``torch.func.grad_and_value(fn, has_aux=True)(params, *args)``, faster when eager.

    Every step of the package takes its gradients here. Eagerly, outside ``torch.func``
    transforms and without autocast, plain ``torch.autograd.grad`` on detached copies
    gives ``grad_and_value``'s gradients bit for bit (tests/training/test_step.py) without
    recording the backward as a differentiable graph (~25% of a LeNet step on the CPU).
    Under autocast the eager step keeps ``grad_and_value`` to give the compiled step's
    numbers: functorch's own BCE-with-logits and ``linear`` bypass autocast (measured in
    docs/benchmarks.md; tests/training/test_autocast.py).
    """
    if not _eager_autograd_allowed(autocast):
        return grad_and_value(fn, has_aux=True)(params, *args)
    with torch.enable_grad():
        leaves = tree_map(lambda leaf: leaf.detach().requires_grad_(), params)
        value, aux = fn(leaves, *args)
        grads = torch.autograd.grad(
            value, tree_leaves(leaves), allow_unused=True, materialize_grads=True
        )
    return tree_unflatten_like(params, grads), (value.detach(), values_out(aux))


def loss_objective(
    model: Model,
    loss_fn: Callable[..., Any],
    autocast_dtype: torch.dtype | None = None,
    *,
    loss_sees: LossSees = "outputs, targets",
    has_aux: bool = False,
) -> Objective:
    """``objective(params, state, inputs, targets, key) -> (loss, (new_state, metrics))``:
    the model in training mode on ``inputs`` (random draws from ``key``), then the loss.

    Args:
        loss_sees: ``"outputs, targets"``: ``loss_fn(outputs, targets)``;
            ``"params, outputs, batch"``: ``loss_fn(params, outputs, targets)`` where
            ``targets`` is the whole batch (a regulariser on the params, any batch pytree).
        has_aux: ``loss_fn`` returns ``(loss, metrics)``, a dict of extra metrics.
    """
    if loss_sees not in LOSS_FORMS:
        raise ValueError(f"loss_sees must be one of {LOSS_FORMS}, got {loss_sees!r}")
    sees_params = loss_sees == "params, outputs, batch"

    def objective(params: Params, state: State, inputs: Any, targets: Any, key: Tensor | None):
        args = inputs if isinstance(inputs, ModelInputs) else (inputs,)
        with _autocast(params, autocast_dtype):
            outputs, new_state = model.apply(params, state, *args, train=True, rng=key)
            result = loss_fn(params, outputs, targets) if sees_params else loss_fn(outputs, targets)
        loss, metrics = result if has_aux else (result, {})
        return loss, (new_state, dict(metrics))

    return objective


class ModelInputs(tuple):
    """Several positional inputs of the model, as ``model_inputs(batch)`` returns them."""


def step_key(ts: TrainState) -> Tensor:
    """The random key of step ``ts.step``: ``prng.fold_in(ts.rng, ts.step)``."""
    return prng.fold_in(ts.rng, ts.step)


def donate_into(old: PyTree, new: PyTree) -> PyTree:
    """``new``, with each leaf's values written into ``old``'s tensor at the same place
    where that tensor fits (same shape, dtype, device and strides) and ``new``'s leaf kept
    where it does not: JAX's buffer donation. ``old`` is consumed."""

    def put(old_leaf: Any, new_leaf: Any) -> Any:
        if not isinstance(old_leaf, Tensor) or not isinstance(new_leaf, Tensor):
            return new_leaf
        if old_leaf is new_leaf:
            return new_leaf  # written in place already (the fused optimiser kernels)
        fits = (old_leaf.shape, old_leaf.dtype, old_leaf.device, old_leaf.stride()) == (
            new_leaf.shape,
            new_leaf.dtype,
            new_leaf.device,
            new_leaf.stride(),
        )
        return old_leaf.copy_(new_leaf) if fits else new_leaf

    return tree_map(put, old, new)


def apply_step(
    ts: TrainState,
    grads: Params,
    new_state: State,
    optimizer: GradientTransformation,
    donate: bool = False,
) -> TrainState:
    """The next ``TrainState``: the optimiser's update of ``ts.params`` by ``grads``, the
    model state ``new_state``, ``step + 1``; every leaf a value (:func:`values_out`).

    With ``donate`` the new params, model state and optimiser state are written into
    ``ts``'s tensors (:func:`donate_into`; eagerly the fused optimiser kernels run in
    place on them, :func:`~functorch_diary.optim.fused.in_place`), so ``ts`` is consumed.
    """
    with fused.in_place(donate):
        params, opt_state = apply_gradients(optimizer, grads, ts.opt_state, ts.params)
    new_ts = values_out(TrainState(params, new_state, opt_state, ts.step + 1, ts.rng))
    if not donate:
        return new_ts
    return new_ts._replace(
        params=donate_into(ts.params, new_ts.params),
        state=donate_into(ts.state, new_ts.state),
        opt_state=donate_into(ts.opt_state, new_ts.opt_state),
    )


def _batch_splitter(
    loss_sees: LossSees, model_inputs: Callable[[Any], Any] | None
) -> Callable[[Any], tuple[Any, Any]]:
    """``batch -> (model inputs, what the loss gets besides the outputs)``."""
    if model_inputs is None and loss_sees == "outputs, targets":
        return lambda batch: (batch[0], batch[1])
    pick = model_inputs or (lambda batch: batch[0])

    def split(batch: Any) -> tuple[Any, Any]:
        inputs = pick(batch)
        inputs = ModelInputs(inputs) if isinstance(inputs, tuple) else inputs
        return inputs, batch if loss_sees == "params, outputs, batch" else batch[1]

    return split


def build_step(
    model: Model,
    loss_fn: LossFn,
    optimizer: GradientTransformation,
    *,
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    key_of: Callable[[TrainState], Tensor] = step_key,
    reduce: Callable[[Params, Tensor, State], tuple[Params, Tensor, State]] | None = None,
    loss_sees: LossSees = "outputs, targets",
    has_aux: bool = False,
    model_inputs: Callable[[Any], Any] | None = None,
    donate: bool = False,
    wrap_objective: Callable[[Objective], Objective] | None = None,
    apply: Callable[[TrainState, Params, State, GradientTransformation, bool], TrainState] = (
        apply_step
    ),
) -> Callable[[TrainState, Batch], tuple[TrainState, Metrics]]:
    """The step body, uncompiled: forward and loss (:func:`loss_objective`), gradients
    (:func:`value_and_grad`), then :func:`apply_step`.

    Every step of the package with ``make_train_step``'s contract is this body; the hooks
    are where the data-parallel and sharded steps differ from one process.

    Args:
        model, loss_fn, optimizer, autocast_dtype, channels_last, donate: as for
            :func:`make_train_step`.
        key_of: the step's random key from the ``TrainState`` (data-parallel ranks fold
            their rank in).
        reduce: ``(grads, loss, new_state) -> (grads, loss, new_state)`` between the
            backward pass and the update: the data-parallel step averages over ranks here,
            the sharded step puts each gradient on its param's shards.
        loss_sees, has_aux, model_inputs: as for :func:`make_train_step`.
        wrap_objective: ``objective -> objective``, the function differentiated (same
            signature as :func:`loss_objective`'s): the sharded step gathers each param
            there when an op uses it, synchronises BatchNorm's statistics and scales the
            loss for the gradients' reduction.
        apply: ``(ts, grads, new_state, optimizer, donate) -> next ts``, by default
            :func:`apply_step` (the sharded step runs it on the local shards).
    """
    objective = loss_objective(model, loss_fn, autocast_dtype, loss_sees=loss_sees, has_aux=has_aux)
    if wrap_objective is not None:
        objective = wrap_objective(objective)
    split = _batch_splitter(loss_sees, model_inputs)

    def step(ts: TrainState, batch: Batch) -> tuple[TrainState, Metrics]:
        inputs, targets = split(batch)
        if channels_last:
            inputs = to_channels_last(inputs)
        grads, (loss, (new_state, metrics)) = value_and_grad(
            objective,
            ts.params,
            ts.state,
            inputs,
            targets,
            key_of(ts),
            autocast=autocast_dtype is not None,
        )
        if reduce is not None:
            grads, loss, new_state = reduce(grads, loss, new_state)
        new_ts = apply(ts, grads, new_state, optimizer, donate)
        if channels_last:
            # Pin the layout of what comes out, so the next call sees the strides this
            # graph was specialised to (a gradient may come back in NCHW order).
            new_ts = to_channels_last(new_ts)
        return new_ts, values_out({"loss": loss, **metrics})

    return step


def make_train_step(
    model: Model,
    loss_fn: LossFn,
    optimizer: GradientTransformation,
    *,
    compile: bool | None = None,
    compile_mode: str | None = None,
    compile_backend: str | Callable = "inductor",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    loss_sees: LossSees = "outputs, targets",
    has_aux: bool = False,
    model_inputs: Callable[[Any], Any] | None = None,
    compile_cache: str | os.PathLike | None = None,
    donate: bool = False,
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
        compile_mode: ``torch.compile``'s mode, one of :data:`COMPILE_MODES`. With
            ``"reduce-overhead"`` (CUDA graphs) each call overwrites the tensors the
            previous call returned: ``ts = step(ts, batch)`` is fine, but clone
            (``tree.tree_clone``) a state you keep from an earlier step.
        compile_backend: ``torch.compile``'s backend; ``"inductor"`` generates kernels,
            ``"aot_eager"`` or a ``torch._dynamo.testing.CompileCounter`` trace without
            code generation (debugging, tests).
        autocast_dtype: ``torch.bfloat16`` (or ``torch.float16``) runs the forward pass
            and the loss under ``torch.autocast``; params, gradients and the optimiser
            stay in the params' dtype.
        channels_last: keep 4-D inputs, weights and optimiser buffers in NHWC memory
            order (faster convolutions on recent GPUs and oneDNN CPUs).
        loss_sees: ``"outputs, targets"`` (the default): ``loss_fn(outputs, batch[1])``;
            ``"params, outputs, batch"``: ``loss_fn(params, outputs, batch)``, for a
            regulariser on the params or a batch of any structure.
        has_aux: ``loss_fn`` returns ``(loss, metrics)``; the metrics (a dict of tensors)
            come back next to ``"loss"``.
        model_inputs: ``batch -> input`` (or a tuple of positional inputs) of the model;
            the default is ``batch[0]``.
        compile_cache: a directory for torch's persistent compile caches (FX graph and
            AOTAutograd caches, portable artifacts): a later process building the same
            step loads it instead of compiling it again
            (:func:`~functorch_diary.training.compile.use_compile_cache`; process-wide).
        donate: JAX's ``donate_argnums`` for the ``TrainState``: the step may write its new
            params, model state and optimiser state into the tensors of the one it is
            given (eagerly, the fused optimiser kernels then run in place, as
            ``torch.optim`` does), saving a copy of them at the step's peak. The given
            ``TrainState`` is consumed: use only the returned one (``ts = step(ts,
            batch)``); passing a donated one again raises ``ValueError``, and any tensor
            kept from it now holds the new values. Its leaves must not share memory.
            The results equal the pure step's bit for bit. Off by default: the step is
            pure.

    The optimiser is the one ``init_train_state`` was given: a state of another
    optimiser is refused by its ``update`` with an error naming both.

    Raises:
        ValueError: an unknown ``compile_mode`` or ``autocast_dtype``; with ``donate``,
            a ``TrainState`` already donated to an earlier step.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from functorch_diary import Model, optim, init_train_state
        >>> model = Model(lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()))
        >>> step = make_train_step(
        ...     model, lambda out, y: out.square().mean(), optim.sgd(0.1),
        ...     autocast_dtype=torch.bfloat16, channels_last=True)
        >>> ts = init_train_state(model, optim.sgd(0.1))
        >>> ts, metrics = step(ts, (torch.ones(1, 1, 4, 4), None))
        >>> ts.params["0.weight"].dtype, ts.params["0.weight"].is_contiguous(
        ...     memory_format=torch.channels_last)
        (torch.float32, True)

        A loss that sees the params, a dict batch and extra metrics:

        >>> def loss(params, out, batch):
        ...     fit = nn.functional.mse_loss(out, batch["y"])
        ...     l2 = sum(p.square().sum() for p in params.values())
        ...     return fit + 1e-4 * l2, {"fit": fit}
        >>> linear = Model(lambda: nn.Linear(3, 1))
        >>> step = make_train_step(linear, loss, optim.sgd(0.1), loss_sees="params, outputs, batch",
        ...                        has_aux=True, model_inputs=lambda batch: batch["x"])
        >>> ts, metrics = step(init_train_state(linear, optim.sgd(0.1)),
        ...                    {"x": torch.ones(4, 3), "y": torch.zeros(4, 1)})
        >>> sorted(metrics)
        ['fit', 'loss']
    """
    _check_options(compile_mode, autocast_dtype)
    step = build_step(
        model,
        loss_fn,
        optimizer,
        autocast_dtype=autocast_dtype,
        channels_last=channels_last,
        loss_sees=loss_sees,
        has_aux=has_aux,
        model_inputs=model_inputs,
        donate=donate,
    )
    policy = with_compile_policy(
        step, compile, compile_mode, compile_backend, channels_last, compile_cache
    )
    return consuming(policy) if donate else policy


# Set on the step counter of a TrainState given to a donating step: its other tensors now
# belong to the TrainState that step returned (whose counter is a new tensor).
_DONATED = "_functorch_diary_donated"


def consuming(step: Callable) -> Callable:
    """``step``, refusing a ``TrainState`` it (or another donating step) was given before;
    an attribute read per call, outside any compiled graph. Every donating step is
    wrapped so (``make_train_step(..., donate=True)``, the sharded step's).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from functorch_diary import Model, optim, init_train_state
        >>> model, opt = Model(lambda: nn.Linear(2, 1)), optim.sgd(0.1)
        >>> step = consuming(build_step(model, nn.functional.mse_loss, opt, donate=True))
        >>> ts = init_train_state(model, opt)
        >>> batch = (torch.ones(4, 2), torch.zeros(4, 1))
        >>> new, _ = step(ts, batch)
        >>> step(ts, batch)
        Traceback (most recent call last):
        ...
        ValueError: this TrainState was donated to an earlier step ...
    """

    def run(ts: TrainState, batch: Batch):
        if getattr(ts.step, _DONATED, False):
            raise ValueError(
                "this TrainState was donated to an earlier step (make_train_step(..., "
                "donate=True)): its tensors now hold that step's results; pass the "
                "TrainState the step returned (ts, metrics = step(ts, batch))"
            )
        out = step(ts, batch)
        setattr(ts.step, _DONATED, True)
        return out

    run.__doc__ = step.__doc__
    run.__wrapped__ = getattr(step, "__wrapped__", step)
    return run


def make_eval_step(
    model: Model,
    loss_fn: LossFn | None = None,
    *,
    compile: bool | None = None,
    compile_mode: str | None = None,
    compile_backend: str | Callable = "inductor",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    compile_cache: str | os.PathLike | None = None,
) -> Callable[[TrainState, Batch], tuple[Any, dict[str, Tensor]]]:
    """Build ``eval_step(train_state, (inputs, targets)) -> (outputs, metrics)``.

    The model runs in eval mode (BatchNorm's running statistics, no dropout); ``metrics``
    holds ``"loss"`` when ``loss_fn`` is given. Compilation and the other options follow
    :func:`make_train_step`; the eval step has its own compile cache, so alternating
    train and eval steps re-traces neither.
    """
    _check_options(compile_mode, autocast_dtype)

    def eval_step(ts: TrainState, batch: Batch) -> tuple[Any, dict[str, Tensor]]:
        inputs, targets = batch
        if channels_last:
            inputs = to_channels_last(inputs)
        with _autocast(ts.params, autocast_dtype):
            outputs, _ = model.apply(ts.params, ts.state, inputs, train=False)
            metrics = {} if loss_fn is None else {"loss": loss_fn(outputs, targets)}
        return values_out((outputs, metrics))

    return with_compile_policy(
        eval_step, compile, compile_mode, compile_backend, channels_last, compile_cache
    )
