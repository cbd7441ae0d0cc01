"""Checks that turn torch's deep errors into messages naming the leaf and both values.

The diaries lose hours to ``Expected object of type torch.FloatTensor but found type
torch.cuda.FloatTensor`` and to shape errors raised deep inside a layer. Every entry
point (``Model.apply``, state_dict loading, checkpoints) calls :func:`check_leaves`
first, so a wrong tree fails before any computation, names the path, and says what to
do. Nothing is modified by a failed check.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor

__all__ = ["LeafSpec", "TreeMismatchError", "check_inputs", "check_leaves"]


class TreeMismatchError(ValueError):
    """A pytree does not have the keys, shapes, dtypes or devices that were expected."""


class LeafSpec(NamedTuple):
    """What a leaf must look like: its shape and dtype (floating dtypes may be swapped
    for another floating dtype, as long as all floating leaves agree)."""

    shape: torch.Size
    dtype: torch.dtype


def _describe(spec: LeafSpec) -> str:
    return f"shape {tuple(spec.shape)}, dtype {spec.dtype}"


def _missing_message(what: str, name: str, spec: LeafSpec) -> str:
    return f"{what} is missing {name!r} (expected {_describe(spec)})"


def _unexpected_message(what: str, name: str, known: Sequence[str]) -> str:
    close = difflib.get_close_matches(name, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{what} has unexpected key {name!r}: the model has no such leaf{hint}"


def check_leaves(
    what: str,
    tree: Mapping[str, Any],
    specs: Mapping[str, LeafSpec],
    *,
    float_dtype: torch.dtype | None = None,
    device: torch.device | None = None,
) -> tuple[torch.dtype | None, torch.device | None]:
    """Check a flat dict of tensors against ``specs``; raise on the first problem.

    Args:
        what: how to name the tree in messages (``"params"``, ``"state"``).
        tree: the dict to check.
        specs: the expected key -> :class:`LeafSpec`.
        float_dtype: the dtype floating leaves must have; ``None`` takes the first one seen.
        device: the device every leaf must be on; ``None`` takes the first one seen.

    Returns:
        The floating dtype and the device that were found, to check the next tree against.

    Raises:
        TreeMismatchError: a key is missing or unexpected, or a leaf has the wrong
            shape, dtype or device. The message names the key and both values.
    """
    if not isinstance(tree, Mapping):
        raise TreeMismatchError(f"{what} must be a dict of tensors, got {type(tree).__name__}")
    for name in tree:
        if name not in specs:
            raise TreeMismatchError(_unexpected_message(what, name, list(specs)))
    first_device_key = None
    for name, spec in specs.items():
        if name not in tree:
            raise TreeMismatchError(_missing_message(what, name, spec))
        leaf = tree[name]
        if not isinstance(leaf, Tensor):
            raise TreeMismatchError(
                f"{what}[{name!r}]: expected a tensor ({_describe(spec)}), "
                f"got {type(leaf).__name__}"
            )
        if leaf.shape != spec.shape:
            raise TreeMismatchError(
                f"{what}[{name!r}]: expected shape {tuple(spec.shape)}, got {tuple(leaf.shape)}"
            )
        if leaf.is_floating_point() and spec.dtype.is_floating_point:
            if float_dtype is None:
                float_dtype = leaf.dtype
            elif leaf.dtype != float_dtype:
                raise TreeMismatchError(
                    f"{what}[{name!r}]: expected dtype {float_dtype} like the other floating "
                    f"leaves, got {leaf.dtype}; convert the whole tree with "
                    f"tree_map(lambda t: t.to({float_dtype}), {what})"
                )
        elif leaf.dtype != spec.dtype:
            raise TreeMismatchError(
                f"{what}[{name!r}]: expected dtype {spec.dtype}, got {leaf.dtype}"
            )
        if device is None:
            device, first_device_key = leaf.device, name
        elif leaf.device != device:
            where = f" (where {what}[{first_device_key!r}] is)" if first_device_key else ""
            raise TreeMismatchError(
                f"{what}[{name!r}]: expected device {device}{where}, got {leaf.device}; "
                f"move every leaf with tree_map(lambda t: t.to({str(device)!r}), {what})"
            )
    return float_dtype, device


def _holds_only_numbers(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return bool(value) and all(_holds_only_numbers(item) for item in value)
    return isinstance(value, (int, float, complex)) and not isinstance(value, bool)


def _check_not_array_like(index: int, value: Any) -> None:
    """Refuse the array-likes a network would choke on with torch's raw argument error.

    Lists of tensors and Python scalars are left alone: a ``forward`` may take them.
    """
    if type(value).__module__ == "numpy" and type(value).__name__ == "ndarray":
        raise TreeMismatchError(
            f"input {index}: expected a tensor, got a numpy array of shape {tuple(value.shape)} "
            f"and dtype {value.dtype}; convert it with torch.from_numpy(x) (and .float() for "
            "float64 data), on the params' device"
        )
    if isinstance(value, (list, tuple)) and _holds_only_numbers(value):
        raise TreeMismatchError(
            f"input {index}: expected a tensor, got a Python {type(value).__name__} of "
            f"numbers (length {len(value)}); convert it with torch.tensor(x, "
            "dtype=torch.float32), on the params' device"
        )


def check_inputs(
    inputs: Sequence[Any], float_dtype: torch.dtype | None, device: torch.device | None
) -> None:
    """Check that tensor inputs live on the params' device and share their float dtype,
    and that no input is a numpy array or a list of numbers where a tensor belongs.

    This is the diaries' ``FloatTensor`` vs ``cuda.FloatTensor`` and float vs double
    error, caught before the first layer with the input's position in the message.
    """
    for index, value in enumerate(inputs):
        if not isinstance(value, Tensor):
            _check_not_array_like(index, value)
            continue
        if device is not None and value.device != device:
            raise TreeMismatchError(
                f"input {index}: expected device {device} (where the params are), got "
                f"{value.device}; move it with x.to({str(device)!r})"
            )
        if float_dtype is not None and value.is_floating_point() and value.dtype != float_dtype:
            if torch.is_autocast_enabled(value.device.type):
                continue  # autocast casts inputs per op, so a float32 input is right there
            raise TreeMismatchError(
                f"input {index}: expected dtype {float_dtype} (the params' dtype), got "
                f"{value.dtype}; convert it with x.to({float_dtype})"
            )
