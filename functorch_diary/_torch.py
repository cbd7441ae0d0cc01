"""Every private torch API the package relies on, in one place.

Each has a public fallback, used when a torch release removes or changes the private
symbol, and tests/test_torch_private.py pins each symbol so such a release fails one
named test instead of silently taking the slow path.
"""

from __future__ import annotations

import os

import torch

__all__ = ["enable_compile_caches", "functorch_transform_active"]


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
