"""Initialisers as pure maps over params, chosen by path selection.

The imperative ``for m in self.modules(): if isinstance(m, nn.Conv2d): kaiming_normal_(...)``
and the inpainting code's ``weights_init('gaussian' | 'xavier' | 'kaiming' | 'orthogonal')`` become
a list of ``(selector, initializer)`` rules applied by :func:`initialize`, which returns
new params and leaves its input alone.

Each initializer is ``torch.nn.init``'s own function run on a fresh CPU tensor with an
explicit generator, so the numbers equal the imperative loop's for the same generator,
and the same seed gives the same weights on every device.

Example:
    >>> import math
    >>> from torch import nn
    >>> from functorch_diary import Model
    >>> from functorch_diary.model import init
    >>> model = Model(lambda: nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4)))
    >>> params, _ = model.init(seed=0)
    >>> params = init.initialize(params, [
    ...     (model.paths_of(nn.Conv2d), init.kaiming_normal(mode="fan_in")),
    ...     (model.paths_of(nn.BatchNorm2d), init.constant(1.0)),
    ...     ("*.bias", init.zeros()),
    ... ], seed=0)
    >>> params["1.weight"].tolist(), params["0.bias"].abs().sum().item()
    ([1.0, 1.0, 1.0, 1.0], 0.0)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor, nn

from ..tree import Params, Selector, select

__all__ = [
    "Initializer",
    "constant",
    "initialize",
    "kaiming_normal",
    "kaiming_uniform",
    "normal",
    "ones",
    "orthogonal",
    "uniform",
    "xavier_normal",
    "xavier_uniform",
    "zeros",
]

#: ``initializer(empty_cpu_tensor, generator) -> filled tensor`` (may fill in place: the
#: tensor is a fresh one made by :func:`initialize`).
Initializer = Callable[[Tensor, torch.Generator], Tensor]


def normal(mean: float = 0.0, std: float = 0.02) -> Initializer:
    """``nn.init.normal_``; the default is DCGAN's 'gaussian' N(0, 0.02)."""
    return lambda t, g: nn.init.normal_(t, mean, std, generator=g)


def uniform(a: float = 0.0, b: float = 1.0) -> Initializer:
    """``nn.init.uniform_`` on [a, b)."""
    return lambda t, g: nn.init.uniform_(t, a, b, generator=g)


def constant(value: float) -> Initializer:
    """``nn.init.constant_``."""
    return lambda t, g: nn.init.constant_(t, value)


def zeros() -> Initializer:
    """All zeros (the imperative ``constant_(m.bias, 0)``)."""
    return constant(0.0)


def ones() -> Initializer:
    """All ones (the imperative ``constant_(bn.weight, 1)``)."""
    return constant(1.0)


def xavier_normal(gain: float = 1.0) -> Initializer:
    """``nn.init.xavier_normal_`` (the inpainting code uses ``gain=math.sqrt(2)``)."""
    return lambda t, g: nn.init.xavier_normal_(t, gain, generator=g)


def xavier_uniform(gain: float = 1.0) -> Initializer:
    """``nn.init.xavier_uniform_``."""
    return lambda t, g: nn.init.xavier_uniform_(t, gain, generator=g)


def kaiming_normal(
    a: float = 0.0, mode: str = "fan_in", nonlinearity: str = "leaky_relu"
) -> Initializer:
    """``nn.init.kaiming_normal_`` (``mode`` is ``"fan_in"`` or ``"fan_out"``)."""
    return lambda t, g: nn.init.kaiming_normal_(t, a, mode, nonlinearity, generator=g)


def kaiming_uniform(
    a: float = math.sqrt(5), mode: str = "fan_in", nonlinearity: str = "leaky_relu"
) -> Initializer:
    """``nn.init.kaiming_uniform_`` (the default ``a`` is what ``nn.Linear`` uses)."""
    return lambda t, g: nn.init.kaiming_uniform_(t, a, mode, nonlinearity, generator=g)


def orthogonal(gain: float = 1.0) -> Initializer:
    """``nn.init.orthogonal_`` (the inpainting code uses ``gain=math.sqrt(2)``)."""
    return lambda t, g: nn.init.orthogonal_(t, gain, generator=g)


def initialize(
    params: Params,
    rules: Sequence[tuple[Selector, Initializer]],
    seed: int | torch.Generator = 0,
) -> Params:
    """New params where each leaf picked by a rule is freshly initialised.

    Leaves are visited in ``params``' order (the module's ``named_parameters`` order,
    which is the order of a ``self.modules()`` loop); each takes the first rule whose
    selector picks it and draws from one generator, so the sequence of random draws is
    the imperative loop's. Leaves no rule picks are returned as they are.

    Args:
        params: the params dict (not modified).
        rules: ``(selector, initializer)`` pairs; a selector is anything
            :func:`~functorch_diary.tree.select` takes.
        seed: an int, or a CPU ``torch.Generator`` to draw from (and advance).
    """
    generator = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    masks = [select(params, selector) for selector, _ in rules]
    out = {}
    for name, leaf in params.items():
        rule = next((fn for mask, (_, fn) in zip(masks, rules, strict=True) if mask[name]), None)
        if rule is None:
            out[name] = leaf
            continue
        fresh = torch.empty(leaf.shape, dtype=leaf.dtype, device="cpu")
        out[name] = rule(fresh, generator).to(leaf.device)
    return out
