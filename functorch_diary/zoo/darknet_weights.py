"""darknet's ``.weights`` files, read into and written from a cfg model's params and state.

The format (darknet's ``load_weights`` / ``save_weights``, little-endian): a header of
three int32 (``major``, ``minor``, ``revision``) and ``seen`` (images trained on: int64
when ``major * 10 + minor >= 2``, int32 before), then float32 values, for every
``[convolutional]`` block in cfg order:

- with ``batch_normalize=1``: BN bias (beta), BN weight (gamma), running mean, running
  variance, then the convolution's weight;
- without: the convolution's bias, then its weight.

Nothing else is stored (no names, no shapes), so the cfg is the only key to the file:
the file must hold exactly the values the cfg's layers need, and a file for another cfg
is caught by its size. The errors say how many values were expected and found and
where the file ends.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import darknet_from_cfg
    >>> from functorch_diary.zoo import darknet_weights
    >>> cfg = "[net]\\n[convolutional]\\nfilters=2\\nsize=1\\nactivation=linear"
    >>> model = darknet_from_cfg(cfg)
    >>> [name for name, _ in darknet_weights.layout(model)]
    ['module_list.0.conv_0.bias', 'module_list.0.conv_0.weight']
"""

from __future__ import annotations

import os
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from ..model.core import Model, State
from ..tree import Params
from .models.darknet import Darknet

__all__ = ["DarknetHeader", "layout", "load_darknet_weights", "save_darknet_weights"]

_BN_ORDER = ("bias", "weight", "running_mean", "running_var")


class DarknetHeader(NamedTuple):
    """The file's version and the number of images its network has seen."""

    major: int = 0
    minor: int = 2
    revision: int = 0
    seen: int = 0

    @property
    def seen_is_int64(self) -> bool:
        return self.major * 10 + self.minor >= 2 and self.major < 1000 and self.minor < 1000

    @property
    def size(self) -> int:
        return 12 + (8 if self.seen_is_int64 else 4)


def _template(model: Model) -> Darknet:
    template = getattr(model, "template", None)
    if not isinstance(template, Darknet):
        raise TypeError(
            f"darknet .weights need a darknet_from_cfg model, got a Model of "
            f"{type(template).__name__}"
        )
    return template


def layout(model: Model) -> list[tuple[str, torch.Size]]:
    """``(key, shape)`` of every value the ``.weights`` file stores, in file order.

    Keys are the model's params and state keys (``module_list.0.conv_0.weight``,
    ``module_list.0.batch_norm_0.running_mean``...).
    """
    template = _template(model)
    tensors = dict(template.named_parameters()) | dict(template.named_buffers())
    out = []
    for index, block in enumerate(template.blocks[1:]):
        if block["type"] != "convolutional":
            continue
        prefix = f"module_list.{index}"
        bn = f"{prefix}.batch_norm_{index}"
        conv = f"{prefix}.conv_{index}"
        first = [f"{bn}.{name}" for name in _BN_ORDER] if f"{bn}.weight" in tensors else []
        names = first or [f"{conv}.bias"]
        out += [(name, tensors[name].shape) for name in [*names, f"{conv}.weight"]]
    return out


def _read_header(data: bytes, path: Path) -> DarknetHeader:
    if len(data) < 12:
        raise ValueError(f"{path}: {len(data)} bytes is shorter than a darknet header (16-20)")
    major, minor, revision = struct.unpack("<3i", data[:12])
    wide = DarknetHeader(major, minor, revision).seen_is_int64
    size = 20 if wide else 16
    if len(data) < size:
        raise ValueError(f"{path}: {len(data)} bytes is shorter than its {size}-byte header")
    (seen,) = struct.unpack("<q" if wide else "<i", data[12:size])
    return DarknetHeader(major, minor, revision, seen)


def load_darknet_weights(
    model: Model, path: str | Path, *, dtype: torch.dtype = torch.float32
) -> tuple[Params, State, DarknetHeader]:
    """Read a ``.weights`` file into fresh ``(params, state)`` for ``model``.

    Args:
        model: a :func:`~functorch_diary.zoo.models.darknet_from_cfg` model.
        path: the ``.weights`` file.
        dtype: of the returned tensors (the file holds float32).

    Returns:
        ``(params, state, header)``, keyed like ``model.init``'s; BatchNorm's
        ``num_batches_tracked`` (not in the format) is 0.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: the file is shorter or longer than the cfg needs (or not whole
            float32 values); the message gives both counts and where the file ends.
    """
    entries = layout(model)  # first: a model of the wrong kind is refused before any I/O
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"darknet weights file {path} not found")
    data = path.read_bytes()
    header = _read_header(data, path)
    payload = len(data) - header.size
    needed = sum(shape.numel() for _, shape in entries)
    if payload % 4:
        raise ValueError(
            f"{path}: {payload} bytes after the {header.size}-byte header are not whole "
            f"float32 values"
        )
    found = payload // 4
    if found != needed:
        convs = sum(name.endswith(".weight") and ".conv_" in name for name, _ in entries)
        message = (
            f"{path}: the cfg's {convs} convolutions need {needed} float32 values after the "
            f"header, the file holds {found}"
        )
        if found < needed:
            offset, at = 0, entries[-1][0]
            for name, shape in entries:
                offset += shape.numel()
                if offset > found:
                    at = name
                    break
            raise ValueError(f"{message}: it ends inside {at} (a truncated file, or another cfg)")
        raise ValueError(
            f"{message}: {found - needed} left over after the last convolution "
            f"(weights for another cfg?)"
        )
    values = torch.from_numpy(np.frombuffer(data, dtype="<f4", offset=header.size).copy())
    params, state = {}, {}
    param_keys = {name for name, _ in _template(model).named_parameters()}
    offset = 0
    for name, shape in entries:
        tensor = values[offset : offset + shape.numel()].reshape(shape).to(dtype).clone()
        (params if name in param_keys else state)[name] = tensor
        offset += shape.numel()
    for name, buffer in _template(model).named_buffers():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.zeros((), dtype=buffer.dtype)
    return params, state, header


def save_darknet_weights(
    path: str | Path,
    model: Model,
    params: Params,
    state: State,
    header: DarknetHeader | None = None,
) -> None:
    """Write ``(params, state)`` of a cfg model as a ``.weights`` file darknet can read.

    ``header`` defaults to ``DarknetHeader()`` (version 0.2.0, ``seen`` 0). The file is
    written to a temporary name and renamed, so a crash leaves no half file.

    Raises:
        KeyError: a value the format stores is missing from ``params``/``state`` (named).
        ValueError: a tensor's shape is not the cfg's (both shown).
    """
    path, header = Path(path), header or DarknetHeader()
    chunks = []
    for name, shape in layout(model):
        tensor = params.get(name, state.get(name))
        if tensor is None:
            raise KeyError(f"{name} is in the cfg but in neither params nor state")
        if tensor.shape != shape:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)}, the cfg says {tuple(shape)}")
        chunks.append(tensor.detach().to("cpu", torch.float32).reshape(-1).numpy().astype("<f4"))
    head = struct.pack("<3i", header.major, header.minor, header.revision)
    head += struct.pack("<q" if header.seen_is_int64 else "<i", header.seen)
    temporary = path.with_name(f".{path.name}.tmp")
    with open(temporary, "wb") as handle:
        handle.write(head)
        for chunk in chunks:
            handle.write(chunk.tobytes())
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
