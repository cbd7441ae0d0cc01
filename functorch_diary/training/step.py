"""``TrainState`` and the pure training step built on ``torch.func.grad_and_value``.

The diaries' loop is ``optimizer.zero_grad(); loss.backward(); optimizer.step()`` on
objects that hold hidden state. Here one pure function maps the whole training state
and a batch to the next state and the metrics; nothing is mutated, nothing needs zeroing,
and the same function runs eagerly or as one ``torch.compile`` d graph.

The compile policy: ``compile=None`` (the default) compiles the whole step (forward,
backward, optimiser update, BatchNorm state, parameter transforms) as one graph when the
params are on CUDA and runs it eagerly elsewhere; ``compile=True`` compiles on the CPU
too. ``fullgraph=True`` turns any graph break into an error, each step function owns its
compile cache (so building many steps in one process never hits Dynamo's recompile
limit), and the train and eval steps are compiled separately, so alternating them
re-traces neither. ``autocast_dtype=torch.bfloat16`` runs forward and loss under
``torch.autocast``; ``channels_last=True`` keeps 4-D inputs, weights and optimiser
buffers in the NHWC memory format.

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
import types
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.func import grad_and_value

from .. import prng
from ..model.core import Model, State
from ..optim.base import GradientTransformation, apply_gradients
from ..tree import Params, PyTree, tree_leaves, tree_map, tree_unflatten_like

__all__ = [
    "COMPILE_MODES",
    "LossFn",
    "TrainState",
    "init_train_state",
    "make_eval_step",
    "make_train_step",
]

#: ``loss_fn(outputs, targets) -> scalar``, e.g. ``torch.nn.functional.cross_entropy``.
LossFn = Callable[[Any, Any], Tensor]
Batch = tuple[Any, Any]
#: The ``torch.compile`` modes a step accepts (``None`` means ``"default"``):
#: ``"reduce-overhead"`` replays CUDA graphs, ``"max-autotune"`` benchmarks kernel choices.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
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


def _on_cuda(state: Any) -> bool:
    return any(isinstance(leaf, Tensor) and leaf.is_cuda for leaf in tree_leaves(state))


def _check_options(compile_mode: str | None, autocast_dtype: torch.dtype | None) -> None:
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise ValueError(
            f"compile_mode must be None or one of {COMPILE_MODES}, got {compile_mode!r}"
        )
    if autocast_dtype is not None and autocast_dtype not in _AUTOCAST_DTYPES:
        raise ValueError(
            f"autocast_dtype must be None, torch.bfloat16 or torch.float16, got {autocast_dtype}"
        )


def _to_channels_last(tree: PyTree) -> PyTree:
    """Every 4-D tensor of ``tree`` in NHWC memory order (a no-op for those already so)."""

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.dim() == 4:
            return leaf.contiguous(memory_format=torch.channels_last)
        return leaf

    return tree_map(convert, tree)


def _autocast(params: Params, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(tree_leaves(params)[0].device.type, dtype=dtype)


def _own_code(fn: Callable) -> Callable:
    """``fn`` with a private copy of its code object.

    Dynamo caches compiled graphs on the code object, and every step that
    ``make_train_step`` builds shares one: the ninth step built in a process (another
    model, another optimiser, a test suite) would count as the ninth recompilation and,
    under ``fullgraph=True``, raise ``FailOnRecompileLimitHit``. A private code object
    gives each step its own cache on every torch version.
    """
    return types.FunctionType(
        fn.__code__.replace(), fn.__globals__, fn.__name__, fn.__defaults__, fn.__closure__
    )


def _grad_and_value(
    fn: Callable[..., tuple[Tensor, Any]], params: Params, *args: Any, autocast: bool = False
) -> tuple[Params, tuple[Tensor, Any]]:
    """``torch.func.grad_and_value(fn, has_aux=True)(params, *args)``, faster when eager.

    Under ``torch.compile``, inside another ``torch.func`` transform (the gradient
    through a step, as MAML takes it) and under autocast this is ``grad_and_value``
    itself. Otherwise, run eagerly, ``grad_and_value`` records the backward pass as a
    differentiable graph (``create_graph=True``, so that its result can be differentiated
    again), which costs ~25% of a LeNet step on the CPU; plain ``torch.autograd.grad`` on
    detached copies gives bit-identical gradients without that cost (except through BCE
    with logits, whose functorch version below moves float32 gradients by ~1e-7). The
    params passed in are not touched either way.

    Under autocast the two paths can differ by a bf16 rounding, and the eager step keeps
    ``grad_and_value`` so as to give the compiled step's numbers. The cause is in torch,
    not in autocast's backward: functorch registers its own ``binary_cross_entropy_with_logits``
    and ``linear`` on the ``FuncTorchDynamicLayerFrontMode`` dispatch key
    (``aten/src/ATen/functorch/PyTorchOperatorHacks.cpp``), which runs before the
    Autocast keys, so inside any ``torch.func`` transform autocast only sees their pieces.
    BCE with logits then loses autocast's float32 policy: its ``exp``/``log`` run in bf16
    on the bf16 logits (loss off by ~3e-4, every gradient by up to 1.5 bf16 eps of its
    largest entry after one step; the DCGAN discriminator's params by 2e-4 after one SGD
    step at lr 0.05 and 1.6e-2 after five with momentum). ``linear`` casts ``weight.t()``,
    a view that autocast's weight cache skips (a Linear applied twice sums its weight
    gradient in float32, not bf16), and for input other than 2-D or contiguous 3-D adds
    the float32 bias in place to the bf16 product. Without these ops (convolutions,
    BatchNorm, 2-D Linear, ``cross_entropy``, ``mse_loss``...) both paths give
    ``loss.backward()``'s gradients bit for bit, and the autograd path does so with them
    too; ``loss_fn(logits.float(), y)`` makes BCE exact on both (tests/test_autocast.py).
    """
    # No public API says "inside a torch.func transform"; the interpreter stack does.
    transformed = torch._C._functorch.peek_interpreter_stack() is not None
    if autocast or transformed or torch.compiler.is_compiling():
        return grad_and_value(fn, has_aux=True)(params, *args)
    with torch.enable_grad():
        leaves = tree_map(lambda leaf: leaf.detach().requires_grad_(), params)
        value, aux = fn(leaves, *args)
        grads = torch.autograd.grad(
            value, tree_leaves(leaves), allow_unused=True, materialize_grads=True
        )
    detach = lambda leaf: leaf.detach() if isinstance(leaf, Tensor) else leaf  # noqa: E731
    return tree_unflatten_like(params, grads), (value.detach(), tree_map(detach, aux))


def _with_compile_policy(
    fn: Callable,
    compile: bool | None,
    mode: str | None,
    backend: str | Callable = "inductor",
    channels_last: bool = False,
) -> Callable:
    """``fn(state, *args)``, compiled as one graph on first call when ``compile`` says so.

    The one compile policy of the project (train, eval and GAN steps): ``compile=None``
    compiles when the state's tensors are on CUDA. ``fullgraph=True`` makes a graph break
    an error instead of a silent slowdown.
    """
    compiled: list[Callable] = []

    def run(state: Any, *args: Any):
        if channels_last:
            # Outside the graph: the compiled step is specialised to its inputs' strides,
            # and it returns NHWC tensors, so the first call must see NHWC ones too.
            state = _to_channels_last(state)
        use = _on_cuda(state) if compile is None else compile
        if not use:
            return fn(state, *args)
        if not compiled:
            compiled.append(
                torch.compile(_own_code(fn), mode=mode, backend=backend, fullgraph=True)
            )
        return compiled[0](state, *args)

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
    compile_backend: str | Callable = "inductor",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
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

    Raises:
        ValueError: an unknown ``compile_mode`` or ``autocast_dtype``.

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
    """
    _check_options(compile_mode, autocast_dtype)
    # Deriving the step's dropout key is ~25 tiny integer ops: skip them when nothing reads it.
    template = getattr(model, "template", None)
    has_dropout = template is None or any(
        isinstance(m, prng.KeyedDropout) for m in template.modules()
    )

    def loss_and_state(params: Params, state: State, inputs: Any, targets: Any, key: Tensor | None):
        with _autocast(params, autocast_dtype):
            outputs, new_state = model.apply(params, state, inputs, train=True, rng=key)
            loss = loss_fn(outputs, targets)
        return loss, new_state

    def step(ts: TrainState, batch: Batch) -> tuple[TrainState, dict[str, Tensor]]:
        inputs, targets = batch
        if channels_last:
            inputs = _to_channels_last(inputs)
        key = prng.fold_in(ts.rng, ts.step) if has_dropout else None
        grads, (loss, new_state) = _grad_and_value(
            loss_and_state,
            ts.params,
            ts.state,
            inputs,
            targets,
            key,
            autocast=autocast_dtype is not None,
        )
        params, opt_state = apply_gradients(optimizer, grads, ts.opt_state, ts.params)
        new_ts = TrainState(params, new_state, opt_state, ts.step + 1, ts.rng)
        if channels_last:
            # Pin the layout of what comes out, so the next call sees the strides this
            # graph was specialised to (a gradient may come back in NCHW order).
            new_ts = _to_channels_last(new_ts)
        return new_ts, {"loss": loss}

    return _with_compile_policy(step, compile, compile_mode, compile_backend, channels_last)


def make_eval_step(
    model: Model,
    loss_fn: LossFn | None = None,
    *,
    compile: bool | None = None,
    compile_mode: str | None = None,
    compile_backend: str | Callable = "inductor",
    autocast_dtype: torch.dtype | None = None,
    channels_last: bool = False,
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
            inputs = _to_channels_last(inputs)
        with _autocast(ts.params, autocast_dtype):
            outputs, _ = model.apply(ts.params, ts.state, inputs, train=False)
            metrics = {} if loss_fn is None else {"loss": loss_fn(outputs, targets)}
        return outputs, metrics

    return _with_compile_policy(eval_step, compile, compile_mode, compile_backend, channels_last)
