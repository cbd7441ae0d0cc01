"""The one compile policy of the project: when and how a step becomes one graph.

``compile=None`` (the default) compiles the whole step (forward, backward, optimiser
update, BatchNorm state, parameter transforms) as one graph when the state's tensors are
on CUDA and runs it eagerly elsewhere; ``compile=True`` compiles on the CPU too.
``fullgraph=True`` turns any graph break into an error; each step owns its compile cache
(so building many steps in one process never hits Dynamo's recompile limit); the train,
eval and GAN steps all go through :func:`with_compile_policy`.

``compile_cache=DIR`` (:func:`use_compile_cache`) compiles once and reuses everywhere:
Inductor's FX graph cache and AOTAutograd's cache are kept under ``DIR``, so a second
process building the same step (same model, optimiser, shapes, torch version) loads the
compiled kernels instead of generating them; ``DIR/artifacts-*.bin`` hold torch's portable
cache artifacts (``torch.compiler.save_cache_artifacts``), written after each first
compile (one file per content, so steps of other processes are never overwritten) and all
loaded before it, so copying ``DIR`` to another machine with the same torch warms its
cache too.
"""

from __future__ import annotations

import glob
import hashlib
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from .._torch import enable_compile_caches
from ..tree import PyTree, tree_leaves, tree_map

__all__ = [
    "ARTIFACTS_GLOB",
    "COMPILE_MODES",
    "to_channels_last",
    "use_compile_cache",
    "with_compile_policy",
]

#: The files under a ``compile_cache`` directory holding torch's portable cache artifacts.
ARTIFACTS_GLOB = "artifacts-*.bin"

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


def use_compile_cache(directory: str | os.PathLike) -> str:
    """Keep Inductor's FX graph cache and AOTAutograd's cache under ``directory`` (made if
    missing) and load the portable artifacts found there; returns the absolute path.

    Torch's caches are per process, not per step: ``TORCHINDUCTOR_CACHE_DIR`` is set for
    the whole process (and the compile workers it starts), so the last directory given
    wins. Both caches are on by default in torch; they are switched on here in case an
    environment variable turned them off.

    Example:
        >>> import tempfile
        >>> path = use_compile_cache(tempfile.mkdtemp())
        >>> os.environ["TORCHINDUCTOR_CACHE_DIR"] == path
        True
    """
    path = os.path.abspath(os.fspath(directory))
    os.makedirs(path, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = path
    enable_compile_caches()
    for artifacts in sorted(glob.glob(os.path.join(path, ARTIFACTS_GLOB))):
        with open(artifacts, "rb") as f:
            torch.compiler.load_cache_artifacts(f.read())
    return path


def _save_artifacts(path: str) -> None:
    """Write what this process compiled as portable artifacts (atomically: a reader in
    another process never sees half a file)."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return  # nothing compiled by Inductor (another backend): nothing to carry
    # Named by content: what another process saved (another step) is never overwritten.
    name = ARTIFACTS_GLOB.replace("*", hashlib.sha256(saved[0]).hexdigest()[:16])
    tmp = os.path.join(path, f".{name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(saved[0])
    os.replace(tmp, os.path.join(path, name))


def with_compile_policy(
    fn: Callable,
    compile: bool | None,
    mode: str | None,
    backend: str | Callable = "inductor",
    channels_last: bool = False,
    compile_cache: str | os.PathLike | None = None,
) -> Callable:
    """``fn(state, *args)``, compiled as one graph on first call when ``compile`` says so
    (``None``: when the state's tensors are on CUDA), through the persistent caches under
    ``compile_cache`` when given (:func:`use_compile_cache`)."""
    compiled: list[Callable] = []

    def run(state: Any, *args: Any):
        if channels_last:
            # Outside the graph: the compiled step is specialised to its inputs' strides,
            # and it returns NHWC tensors, so the first call must see NHWC ones too.
            state = to_channels_last(state)
        use = _on_cuda(state) if compile is None else compile
        if not use:
            return fn(state, *args)
        if compiled:
            return compiled[0](state, *args)
        cache = None if compile_cache is None else use_compile_cache(compile_cache)
        compiled.append(torch.compile(_own_code(fn), mode=mode, backend=backend, fullgraph=True))
        out = compiled[0](state, *args)  # the first call compiles
        if cache is not None:
            _save_artifacts(cache)
        return out

    run.__doc__ = fn.__doc__
    run.__wrapped__ = fn  # the eager function, for tests and debugging
    return run
