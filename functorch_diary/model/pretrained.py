"""Pretrained weights from a local file: whole (strict) or partial, with a report.

Seed 004 (section 7) builds DeepLabv3 on a ResNet and copies in only the ResNet-152
checkpoint entries whose names exist in the new model::

    pretrain_dict = model_zoo.load_url(model_urls['resnet152'])
    model_dict = {k: v for k, v in pretrain_dict.items() if k in state_dict}
    state_dict.update(model_dict); self.load_state_dict(state_dict)

That silently skips what does not fit and crashes on a shape mismatch. Here
:func:`load_partial` takes the entries whose name *and* shape match (optionally only
the ones a :func:`~functorch_diary.tree.select` selector picks), returns new
``(params, state)`` and says by name what was missing, unexpected or mismatched.

Files are read with ``checkpoint.load_torch_file`` (no code runs while loading) onto
the CPU first, then moved to where the params live: a checkpoint saved on ``cuda:3``
loads on a machine with one GPU or none (seed 004 section 9). Nothing is downloaded.

Example:
    >>> import tempfile, os, torch
    >>> from torch import nn
    >>> from functorch_diary import Model
    >>> from functorch_diary.model.pretrained import load_partial
    >>> path = os.path.join(tempfile.mkdtemp(), "ckpt.pth")
    >>> torch.save(nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 3)).state_dict(), path)
    >>> model = Model(lambda: nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 5)))
    >>> params, state = model.init(seed=0)
    >>> report = load_partial(model, path, params, state)
    >>> report.loaded, report.mismatched[0].name
    (['0.weight', '0.bias'], '1.weight')
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from ..checkpoint.format import CheckpointError
from ..checkpoint.torch_files import load_torch_file
from ..tree import Params, Selector, select
from .checks import TreeMismatchError
from .core import Model, State

__all__ = ["LoadReport", "Mismatch", "load_partial", "load_pretrained", "load_state_dict_file"]

Source = str | os.PathLike | Mapping[str, Tensor]


class Mismatch(NamedTuple):
    """A checkpoint entry whose name matches but whose shape does not."""

    name: str
    expected: tuple[int, ...]
    got: tuple[int, ...]


class LoadReport(NamedTuple):
    """What :func:`load_partial` did.

    Attributes:
        params, state: new trees; checkpoint values where loaded, the given ones elsewhere.
        loaded: the keys taken from the checkpoint, in the model's ``state_dict`` order.
        missing: model keys the checkpoint lacks (they keep the given values).
        unexpected: checkpoint keys the model does not have (ignored).
        mismatched: keys present in both with different shapes (kept from the model).
        skipped: matching keys the selector left out (kept from the model).
    """

    params: Params
    state: State
    loaded: list[str]
    missing: list[str]
    unexpected: list[str]
    mismatched: list[Mismatch]
    skipped: list[str]


def load_state_dict_file(path: str | os.PathLike) -> dict[str, Tensor]:
    """Read a ``state_dict`` saved with ``torch.save`` onto the CPU, executing no code.

    A ``{"model": state_dict, ...}`` checkpoint (seed 000's save format) or a
    ``{"state_dict": ...}`` one is unwrapped.

    Args:
        path: the ``.pth``/``.pt`` file.

    Returns:
        A flat dict of CPU tensors.

    Raises:
        FileNotFoundError: the file does not exist (nothing is ever downloaded).
        CheckpointError: the file is not a ``torch.save`` file of a dict of tensors (garbage,
            truncated, or asking to run code); the message names it.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"no checkpoint at {str(file)!r}: functorch-diary never downloads weights; save "
            "them first, e.g. torch.save(torchvision.models.resnet18(weights=...).state_dict(), "
            "path), on a machine with network access"
        )
    loaded = load_torch_file(file)
    if isinstance(loaded, Mapping):
        for wrapper in ("model", "state_dict"):
            if isinstance(loaded.get(wrapper), Mapping):
                loaded = loaded[wrapper]
                break
    if not isinstance(loaded, Mapping) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise CheckpointError(f"{str(file)!r} does not hold a state_dict (a dict of tensors)")
    return dict(loaded)


def _as_state_dict(source: Source) -> Mapping[str, Tensor]:
    return source if isinstance(source, Mapping) else load_state_dict_file(source)


def load_pretrained(
    model: Model,
    source: Source,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Params, State]:
    """Every key of a checkpoint into ``(params, state)``: ``load_state_dict(strict=True)``.

    Args:
        model: the functional model.
        source: a file path or an in-memory ``state_dict``.
        device, dtype: where and in which floating dtype the result goes (default: CPU,
            the checkpoint's dtype).

    Returns:
        ``(params, state)`` for :meth:`Model.apply`.

    Raises:
        FileNotFoundError: no such file.
        TreeMismatchError: a key is missing or unexpected, or a shape differs (use
            :func:`load_partial` to take only what fits).
    """
    params, state = model.from_state_dict(_as_state_dict(source))

    def move(t: Tensor) -> Tensor:
        return t.to(device=device, dtype=dtype if t.is_floating_point() else None)

    return {k: move(v) for k, v in params.items()}, {k: move(v) for k, v in state.items()}


def load_partial(
    model: Model,
    source: Source,
    params: Params,
    state: State,
    *,
    selector: Selector | None = None,
) -> LoadReport:
    """Take the checkpoint entries that fit the model; report the rest by name.

    Args:
        model: the functional model.
        source: a file path or an in-memory ``state_dict``.
        params, state: the current trees (e.g. from ``model.init``); they supply every
            leaf that is not loaded and are not modified.
        selector: optionally, which leaves may be loaded (a :func:`tree.select` selector
            over the merged params and state, e.g. ``"layer*"``); others are ``skipped``.

    Returns:
        A :class:`LoadReport`; loaded tensors take the dtype and device of the leaf they
        replace.

    Raises:
        FileNotFoundError: no such file.
        TreeMismatchError: ``params``/``state`` do not have the model's keys.
    """
    for what, tree, specs in (
        ("params", params, model.param_specs),
        ("state", state, model.state_specs),
    ):
        if set(tree) != set(specs):
            wrong = sorted(set(tree) ^ set(specs))
            raise TreeMismatchError(f"{what} does not have the model's keys; differing: {wrong}")
    checkpoint = _as_state_dict(source)
    current = {**params, **state}
    persistent = list(model.state_dict(params, state))
    allowed = select(current, selector) if selector is not None else dict.fromkeys(current, True)
    updates: dict[str, Tensor] = {}
    loaded, missing, mismatched, skipped = [], [], [], []
    for name in persistent:
        if name not in checkpoint:
            missing.append(name)
            continue
        value, target = checkpoint[name], current[name]
        if tuple(value.shape) != tuple(target.shape):
            mismatched.append(Mismatch(name, tuple(target.shape), tuple(value.shape)))
        elif not allowed[name]:
            skipped.append(name)
        else:
            updates[name] = value.detach().to(device=target.device, dtype=target.dtype, copy=True)
            loaded.append(name)
    known = set(persistent)
    unexpected = [name for name in checkpoint if name not in known]
    new_params = {k: updates.get(k, v) for k, v in params.items()}
    new_state = {k: updates.get(k, v) for k, v in state.items()}
    return LoadReport(new_params, new_state, loaded, missing, unexpected, mismatched, skipped)
