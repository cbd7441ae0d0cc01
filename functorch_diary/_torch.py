"""Every private torch API the package relies on, in one place.

Each has a public fallback, used when a torch release removes or changes the private
symbol, and tests/test_torch_private.py pins each symbol so such a release fails one
named test instead of silently taking the slow path.
"""

from __future__ import annotations

import linecache
import os
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, fx

__all__ = [
    "FUSED_KERNELS",
    "enable_compile_caches",
    "exec_fx_graph",
    "functorch_transform_active",
    "is_functorch_wrapped",
    "optional",
    "weight_norm",
]


def functorch_transform_active() -> bool | None:
    """Whether a ``torch.func`` transform (grad, vmap, ...) is running the caller.

    ``None`` when this torch has no way to tell (the private interpreter stack is gone):
    callers then take the path that is correct inside transforms too.
    """
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", None)
    if peek is None:
        return None
    return peek() is not None


def optional(owner: Any, name: str) -> Any:
    """``owner.name``, or ``None`` when this torch release has no such private symbol."""
    return getattr(owner, name, None)


def weight_norm(v: Tensor, g: Tensor, dim: int, *, private: bool = True) -> Tensor:
    """``g * v / ||v||`` (the norm over every dim but ``dim``), as torch's weight_norm
    parametrization computes it: through its private kernel ``torch._weight_norm`` (bit
    for bit), or with public ops when it is gone or ``private=False``."""
    kernel = optional(torch, "_weight_norm") if private else None
    if kernel is not None:
        return kernel(v, g, dim)
    return v * (g / torch.norm_except_dim(v, 2, dim))


def _all_wrapped(tensor: Tensor) -> bool:
    return True


#: Whether a tensor is a ``torch.func`` wrapper (a vmap or grad level); without the private
#: check every tensor counts as wrapped, so in-place fast paths are never taken.
is_functorch_wrapped: Callable[[Tensor], bool] = (
    optional(optional(torch._C, "_functorch"), "is_functorch_wrapped_tensor") or _all_wrapped
)

#: torch's fused CPU optimiser kernels (what ``torch.optim.X(fused=True)`` runs), ``None``
#: where a release lacks one: ``optim.fused`` then takes the checked ``update`` path.
FUSED_KERNELS: dict[str, Callable[..., Any] | None] = {
    name: optional(torch, f"_fused_{name}_") for name in ("sgd", "adam", "adamw", "adagrad")
}


def exec_fx_graph(graph: fx.Graph, label: str) -> Callable[..., Any]:
    """The ``forward(self, ...)`` function that fx generates for ``graph``, executed from its
    source (fx's own ``GraphModule`` does the same), registered with linecache so that
    tracebacks through it show the generated lines."""
    code = graph.python_code(root_module="self")
    filename = f"<functorch_diary {label}>"
    linecache.cache[filename] = (len(code.src), None, code.src.splitlines(True), filename)
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)
    return namespace["forward"]
def enable_compile_caches() -> None:
    """Switch on Inductor's FX graph cache and AOTAutograd's cache (both on by default in
    torch 2.x, but an environment variable may have turned them off).

    Through the private config modules when present; otherwise through the documented
    environment variables, which torch reads when it first imports those modules.
    """
    try:
        import torch._functorch.config as aot_config
        import torch._inductor.config as inductor_config
    except ImportError:
        os.environ["TORCHINDUCTOR_FX_GRAPH_CACHE"] = "1"
        os.environ["TORCHINDUCTOR_AUTOGRAD_CACHE"] = "1"
        return
    inductor_config.fx_graph_cache = True
    aot_config.enable_autograd_cache = True
