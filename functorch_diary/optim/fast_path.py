"""When an optimiser stage may take its eager fast path.

A stage's ``update_and_apply`` folds the update into the new params the way
``torch.optim`` folds it into its last in-place kernel: it writes the new params into
tensors the same call allocated (never into an argument), so the step makes fewer passes
over memory than ``update`` + ``apply_updates``. It reads step counts and learning rates as
Python numbers, as ``torch.optim`` does, so its rounding is torch's to the bit.

Both tricks are only right in plain eager code. While Dynamo traces, reading a number
would break the graph; under ``torch.func`` transforms tensors are wrapped; while
autograd records, ``out=`` is not differentiable; and a number that lives on an
accelerator costs a device synchronisation to read. In those cases the stage falls back to
``update`` + ``apply_updates`` (the same arithmetic): a compiled step fuses on its own.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch
from torch import Tensor

from .._torch import is_functorch_wrapped

__all__ = ["eager_leaves", "host_number"]


_requires_grad = operator.attrgetter("requires_grad")


def eager_leaves(*leaf_lists: Sequence[Tensor]) -> bool:
    """True when plain in-place kernels may run on these leaves (pass every tensor the step
    reads: grads, params and state): not under compile, not inside a ``torch.func``
    transform, and not recorded by autograd.

    Example:
        >>> import torch
        >>> eager_leaves([torch.ones(2)]), eager_leaves([torch.ones(2, requires_grad=True)])
        (True, False)
    """
    if torch.compiler.is_compiling():
        return False
    leaves = [t for leaf_list in leaf_lists for t in leaf_list]
    # Any leaf may be the wrapped one: vmap over params alone leaves the grads plain.
    # (map over the C functions: this runs on every eager step, over every leaf.)
    if not leaves or any(map(is_functorch_wrapped, leaves)):
        return False
    return not (torch.is_grad_enabled() and any(map(_requires_grad, leaves)))


def host_number(value: float | Tensor) -> float | None:
    """``value`` as a Python number if reading it costs no device synchronisation, else
    ``None`` (the caller then takes the tensor path).

    Example:
        >>> import torch
        >>> host_number(0.1), host_number(torch.tensor(3))
        (0.1, 3)
    """
    if not isinstance(value, Tensor):
        return value
    if value.device.type != "cpu" or is_functorch_wrapped(value):
        return None
    return value.item()
