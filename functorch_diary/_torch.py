"""Every private torch API the package relies on, in one place.

Each has a public fallback, used when a torch release removes or changes the private
symbol, and tests/test_torch_private.py pins each symbol so such a release fails one
named test instead of silently taking the slow path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["functorch_transform_active", "optional", "weight_norm"]


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
