"""Explicit, splittable randomness built from plain tensor ops.

torch's dropout reads a global generator, so the same call gives different masks each
time and a ``vmap`` over samples cannot give each sample a chosen mask. Here a *key* is
a 0-dim ``int64`` tensor and every random number is a hash of (key, position): the same
key always gives the same numbers, on any device, eagerly, under ``torch.compile`` and
under ``vmap`` (a batch of keys gives a batch of independent streams).

Inside ``Model.apply`` every random torch function is answered from such keys
(:mod:`functorch_diary.model.randomness`).

The hash is two rounds of a 32-bit integer mixer (multiply, xor-shift). Every product
stays below 2**63, so int64 arithmetic never overflows on any backend.

Example:
    >>> import torch
    >>> from functorch_diary import prng
    >>> key = prng.key(0)
    >>> a = prng.uniform(key, (3,))
    >>> torch.equal(a, prng.uniform(key, (3,)))
    True
    >>> torch.equal(a, prng.uniform(prng.fold_in(key, 1), (3,)))
    False
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["bits", "fold_in", "key", "normal", "uniform"]

_MASK32 = 0xFFFFFFFF
_MUL1 = 0x7FEB352D  # both multipliers are below 2**31: a 32-bit value times one fits in int64
_MUL2 = 0x5BD1E995
_GOLDEN = 0x9E3779B1


def _mix32(x: Tensor) -> Tensor:
    x = x ^ (x >> 16)
    x = (x * _MUL1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL2) & _MASK32
    return x ^ (x >> 16)


def key(seed: int | Tensor, device: torch.device | str | None = None) -> Tensor:
    """A key (0-dim int64 tensor) from an integer seed."""
    if isinstance(seed, Tensor):
        return seed.to(dtype=torch.int64, device=device or seed.device)
    return torch.tensor(int(seed) & 0x7FFFFFFFFFFFFFFF, dtype=torch.int64, device=device)


def fold_in(base: Tensor, data: int | Tensor) -> Tensor:
    """A new key derived from ``base`` and ``data`` (a step count, a layer index...)."""
    data = torch.as_tensor(data, dtype=torch.int64, device=base.device)
    low = _mix32((base & _MASK32) ^ _mix32(data & _MASK32))
    high = _mix32(((base >> 32) & _MASK32) ^ _mix32((data * _GOLDEN) & _MASK32) ^ low)
    return ((high & 0x7FFFFFFF) << 32) | low


def bits(key: Tensor, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """Uniform 32-bit integers (int64 in [0, 2**32)), a pure function of ``key`` and ``shape``."""
    counter = torch.arange(int(torch.Size(shape).numel()), device=key.device, dtype=torch.int64)
    low, high = _mix32(key & _MASK32), _mix32((key >> 32) & _MASK32)
    return _mix32(_mix32(((counter * _GOLDEN) & _MASK32) ^ low) ^ high).reshape(shape)


def uniform(
    key: Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Numbers in [0, 1) on the key's device, a pure function of ``key`` and ``shape``."""
    # 24 random bits are exact in every float dtype we use and give an unbiased grid.
    return (bits(key, shape) >> 8).to(dtype) * (1.0 / (1 << 24))


def normal(
    key: Tensor, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Standard normal numbers, a pure function of ``key`` and ``shape`` (Box-Muller over
    two :func:`uniform` streams of the key).

    The uniforms have 24 random bits, so ``|x|`` never exceeds ``sqrt(2 ln 2**24)``, about
    5.8: the tails beyond are cut (a draw that far out has probability below 1e-8).

    Example:
        >>> import torch
        >>> x = normal(key(0), (100_000,), torch.float64)
        >>> abs(float(x.mean())) < 0.01, abs(float(x.std()) - 1) < 0.01
        (True, True)
    """
    work = torch.float64 if dtype == torch.float64 else torch.float32
    u = uniform(key, (2, *shape), work)
    radius = torch.sqrt(-2.0 * torch.log1p(-u[0]))  # 1 - u is in (0, 1]: the log is finite
    return (radius * torch.cos((2 * math.pi) * u[1])).to(dtype)
