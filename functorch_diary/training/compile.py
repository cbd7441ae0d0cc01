"""The one compile policy of the project: when and how a step becomes one graph.

``compile=None`` (the default) compiles the whole step (forward, backward, optimiser
update, BatchNorm state, parameter transforms) as one graph when the state's tensors are
on CUDA and runs it eagerly elsewhere; ``compile=True`` compiles on the CPU too.
``fullgraph=True`` turns any graph break into an error; each step owns its compile cache
(so building many steps in one process never hits Dynamo's recompile limit); the train,
eval and GAN steps all go through :func:`with_compile_policy`.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..tree import PyTree, tree_leaves, tree_map

__all__ = ["COMPILE_MODES", "to_channels_last", "with_compile_policy"]

#: The ``torch.compile`` modes a step accepts (``None`` means ``"default"``):
#: ``"reduce-overhead"`` replays CUDA graphs, ``"max-autotune"`` benchmarks kernel choices.
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _on_cuda(state: Any) -> bool:
    return any(isinstance(leaf, Tensor) and leaf.is_cuda for leaf in tree_leaves(state))


def to_channels_last(tree: PyTree) -> PyTree:
    """Every 4-D tensor of ``tree`` in NHWC memory order (a no-op for those already so)."""

    def convert(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.dim() == 4:
            return leaf.contiguous(memory_format=torch.channels_last)
        return leaf

    return tree_map(convert, tree)


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


def with_compile_policy(
    fn: Callable,
    compile: bool | None,
    mode: str | None,
    backend: str | Callable = "inductor",
    channels_last: bool = False,
) -> Callable:
    """``fn(state, *args)``, compiled as one graph on first call when ``compile`` says so
    (``None``: when the state's tensors are on CUDA)."""
    compiled: list[Callable] = []

    def run(state: Any, *args: Any):
        if channels_last:
            # Outside the graph: the compiled step is specialised to its inputs' strides,
            # and it returns NHWC tensors, so the first call must see NHWC ones too.
            state = to_channels_last(state)
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
