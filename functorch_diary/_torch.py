"""Every private torch API the package relies on, in one place.

Each has a public fallback, used when a torch release removes or changes the private
symbol, and tests/test_torch_private.py pins each symbol so such a release fails one
named test instead of silently taking the slow path.
"""

from __future__ import annotations

import torch

__all__ = ["functorch_transform_active"]


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
