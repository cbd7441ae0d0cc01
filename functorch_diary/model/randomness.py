"""Every random draw made while a forward runs comes from the explicit key.

torch's random functions read a hidden global generator: the same call gives different
numbers each time, ``vmap`` refuses them, and ``apply`` would not be a function of its
arguments. :class:`KeyedRandomness` is a ``TorchFunctionMode``: while it is active, each
random function a forward calls (a module's or the user's own: ``nn.Dropout*``,
``F.dropout*``, ``torch.rand*``/``randn*``/``randint*``/``randperm``, ``bernoulli``,
``multinomial``, ``normal``, ``Tensor.uniform_``/``normal_``/``bernoulli_``/...,
``rrelu``, ``gumbel_softmax``, scaled-dot-product attention's dropout, torchvision's
``StochasticDepth``) is answered from :mod:`functorch_diary.prng` instead. Draw ``i``
uses ``prng.fold_in(key, i)``, so the same key gives the same bits, eagerly, under
``torch.compile(fullgraph=True)`` (the mode is traced; no graph break) and under ``vmap``
(a batch of keys gives a batch of independent streams).

A random function with no keyed version here (``poisson``, gamma and Dirichlet samples,
``nn.MultiheadAttention``'s attention-weight dropout, which happens inside a composite
that cannot be intercepted) raises :class:`UnkeyedRandomnessError` rather than read the
global generator. An explicit ``generator=`` argument is the caller's own stream and is
used as given.

Example:
    >>> import torch
    >>> from torch.nn import functional as F
    >>> from functorch_diary import prng
    >>> def noisy(x):
    ...     return F.dropout(x, 0.5) + 0.1 * torch.randn_like(x)
    >>> x = torch.ones(4)
    >>> with KeyedRandomness(prng.key(0)):
    ...     a = noisy(x)
    >>> with KeyedRandomness(prng.key(0)):
    ...     b = noisy(x)
    >>> torch.equal(a, b)
    True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

from .. import prng
from .._torch import optional

__all__ = ["KEYED_FUNCTIONS", "KeyedRandomness", "MissingRngError", "UnkeyedRandomnessError"]


class MissingRngError(ValueError):
    """A forward drew random numbers but ``apply`` got no ``rng``."""


class UnkeyedRandomnessError(RuntimeError):
    """A forward called a random function that has no keyed version."""


class KeyedRandomness(TorchFunctionMode):
    """Answer every random torch function called inside from ``key``.

    Args:
        key: a :func:`prng.key` (a batch of keys under ``vmap``), or ``None``: then the
            first random draw raises :class:`MissingRngError` naming the function.
        hint: appended to that error, e.g. what to pass.
    """

    def __init__(self, key: Tensor | None, hint: str = "") -> None:
        super().__init__()
        self.key = key
        self.hint = hint
        self.draws = 0

    def next_key(self, what: str) -> Tensor:
        """The key of the next draw; ``what`` names the function for the error."""
        if self.key is None:
            raise MissingRngError(f"{what} draws random numbers, and no rng was given{self.hint}")
        key = prng.fold_in(self.key, self.draws)
        self.draws += 1
        return key

    def __torch_function__(
        self, func: Callable, types: Any, args: Sequence[Any] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        keyed = KEYED_FUNCTIONS.get(func)
        if keyed is None or kwargs.get("generator") is not None:
            return func(*args, **kwargs)
        return keyed(self, *args, **kwargs)


# --- draws -------------------------------------------------------------------------------


def _uniform(mode: KeyedRandomness, what: str, shape: Sequence[int], like: Tensor) -> Tensor:
    """U[0, 1) of ``shape`` with ``like``'s floating dtype (float32 for others) and device."""
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return prng.uniform(mode.next_key(what).to(like.device), tuple(shape), dtype)


def _standard_normal(
    mode: KeyedRandomness, what: str, shape: Sequence[int], like: Tensor
) -> Tensor:
    """N(0, 1) of ``shape`` with ``like``'s floating dtype (float32 for others) and device."""
    dtype = like.dtype if like.is_floating_point() else torch.get_default_dtype()
    return prng.normal(mode.next_key(what).to(like.device), tuple(shape), dtype)


def _bits63(mode: KeyedRandomness, what: str, shape: Sequence[int], device: torch.device) -> Tensor:
    """Uniform integers in [0, 2**63) (int64) of ``shape``."""
    key = mode.next_key(what).to(device)
    high = prng.bits(prng.fold_in(key, 0), tuple(shape)) & 0x7FFFFFFF
    return (high << 32) | prng.bits(prng.fold_in(key, 1), tuple(shape))


def _size(size: Sequence[Any]) -> tuple[int, ...]:
    """``torch.rand``'s size forms: ``(2, 3)``, ``((2, 3),)``, ``(torch.Size(...),)``."""
    if len(size) == 1 and isinstance(size[0], Sequence):
        size = size[0]
    return tuple(int(s) for s in size)


def _factory(
    values: Callable[[KeyedRandomness, str, tuple[int, ...], Tensor], Tensor], what: str
) -> Callable[..., Tensor]:
    """A keyed ``torch.rand``-style factory: ``(*size, dtype=, device=, requires_grad=)``."""

    def factory(
        mode: KeyedRandomness,
        *sizes: Any,
        dtype: torch.dtype | None = None,
        device: Any = None,
        requires_grad: bool = False,
        size: Any = None,
        **_: Any,
    ) -> Tensor:
        like = torch.empty((), dtype=dtype or torch.get_default_dtype(), device=device)
        out = values(mode, what, _size(sizes if size is None else (size,)), like).to(like.dtype)
        return out.requires_grad_(requires_grad)

    factory.__name__ = what
    return factory


def _like(
    values: Callable[[KeyedRandomness, str, tuple[int, ...], Tensor], Tensor], what: str
) -> Callable[..., Tensor]:
    """A keyed ``torch.rand_like``-style function."""

    def like_fn(
        mode: KeyedRandomness,
        input: Tensor,
        *,
        dtype: torch.dtype | None = None,
        device: Any = None,
        requires_grad: bool = False,
        **_: Any,
    ) -> Tensor:
        target = torch.empty((), dtype=dtype or input.dtype, device=device or input.device)
        out = values(mode, what, tuple(input.shape), target).to(target.dtype)
        return out.requires_grad_(requires_grad)

    return like_fn


def _in_place(values: Callable[..., Tensor], what: str) -> Callable[..., Tensor]:
    """A keyed ``Tensor.uniform_``-style method: fill ``self`` and return it."""

    def method(mode: KeyedRandomness, self: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        kwargs.pop("generator", None)
        drawn = values(mode, what, self, *args, **kwargs)
        try:
            with torch.no_grad():
                return self.copy_(drawn)
        except RuntimeError:
            # Under vmap the draw is batched (one stream per key) and ``self`` may not be
            # (``torch.empty(size).bernoulli_(p)``): the batched draw is the result.
            return drawn

    return method


def _uniform_values(
    mode: KeyedRandomness, what: str, like: Tensor, low: float = 0.0, high: float = 1.0, **kw: Any
) -> Tensor:
    low, high = kw.get("from", low), kw.get("to", high)
    return low + (high - low) * _uniform(mode, what, like.shape, like)


def _normal_values(
    mode: KeyedRandomness, what: str, like: Tensor, mean: float = 0.0, std: float = 1.0
) -> Tensor:
    return mean + std * _standard_normal(mode, what, like.shape, like)


def _bernoulli_values(mode: KeyedRandomness, what: str, like: Tensor, p: Any = 0.5) -> Tensor:
    return (_uniform(mode, what, like.shape, like) < p).to(like.dtype)


def _exponential_values(
    mode: KeyedRandomness, what: str, like: Tensor, lambd: float = 1.0
) -> Tensor:
    return -torch.log1p(-_uniform(mode, what, like.shape, like)) / lambd


def _geometric_values(mode: KeyedRandomness, what: str, like: Tensor, p: float) -> Tensor:
    u = _uniform(mode, what, like.shape, like).double()
    return torch.ceil(torch.log1p(-u) / math.log1p(-p)).clamp_min(1).to(like.dtype)


def _cauchy_values(
    mode: KeyedRandomness, what: str, like: Tensor, median: float = 0.0, sigma: float = 1.0
) -> Tensor:
    return median + sigma * torch.tan(math.pi * (_uniform(mode, what, like.shape, like) - 0.5))


def _log_normal_values(
    mode: KeyedRandomness, what: str, like: Tensor, mean: float = 1.0, std: float = 2.0
) -> Tensor:
    return torch.exp(mean + std * _standard_normal(mode, what, like.shape, like))


def _integers(
    mode: KeyedRandomness, what: str, shape: Sequence[int], low: int, high: int, device: Any
) -> Tensor:
    if high <= low:
        raise ValueError(f"{what}: expected low < high, got low={low}, high={high}")
    return low + _bits63(mode, what, shape, torch.device(device or "cpu")) % (high - low)


def _random_values(
    mode: KeyedRandomness,
    what: str,
    like: Tensor,
    low: int | None = None,
    high: int | None = None,
    **kw: Any,
) -> Tensor:
    low, high = kw.get("from", low), kw.get("to", high)
    if low is not None and high is None and "from" not in kw:
        low, high = 0, low  # random_(to)
    if low is None:
        low = 0
    if high is None:
        if like.is_floating_point():
            high = 2 ** (torch.finfo(like.dtype).nmant + 1) + 1
        else:
            high = torch.iinfo(like.dtype).max if like.dtype != torch.bool else 2
    return _integers(mode, what, like.shape, int(low), int(high), like.device).to(like.dtype)


# --- torch.* functions --------------------------------------------------------------------


def _randint(
    mode: KeyedRandomness,
    *args: Any,
    dtype: torch.dtype | None = None,
    device: Any = None,
    requires_grad: bool = False,
    low: int | None = None,
    high: int | None = None,
    size: Any = None,
    **_: Any,
) -> Tensor:
    args = list(args)
    if size is None:
        size = args.pop()
    if high is None:
        high = args.pop()
    if low is None:
        low = args.pop() if args else 0
    out = _integers(mode, "torch.randint", _size((size,)), int(low), int(high), device)
    return out.to(dtype or torch.int64)


def _randint_like(
    mode: KeyedRandomness,
    input: Tensor,
    *args: Any,
    dtype: torch.dtype | None = None,
    device: Any = None,
    low: int | None = None,
    high: int | None = None,
    **_: Any,
) -> Tensor:
    args = list(args)
    if high is None:
        high = args.pop()
    if low is None:
        low = args.pop() if args else 0
    out = _integers(
        mode, "torch.randint_like", input.shape, int(low), int(high), device or input.device
    )
    return out.to(dtype or input.dtype)


def _randperm(
    mode: KeyedRandomness,
    n: int,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    requires_grad: bool = False,
    **_: Any,
) -> Tensor:
    order = torch.argsort(_bits63(mode, "torch.randperm", (int(n),), torch.device(device or "cpu")))
    return order.to(dtype or torch.int64)


def _normal(
    mode: KeyedRandomness,
    mean: Any = 0.0,
    std: Any = 1.0,
    size: Any = None,
    *,
    dtype: torch.dtype | None = None,
    device: Any = None,
    requires_grad: bool = False,
    **_: Any,
) -> Tensor:
    tensors = [t for t in (mean, std) if isinstance(t, Tensor)]
    if tensors:
        shape, like = torch.broadcast_shapes(*(t.shape for t in tensors)), tensors[0]
    else:
        shape = _size((size,))
        like = torch.empty((), dtype=dtype or torch.get_default_dtype(), device=device)
    out = mean + std * _standard_normal(mode, "torch.normal", shape, like)
    return out.requires_grad_() if requires_grad else out


def _bernoulli(mode: KeyedRandomness, input: Tensor, p: Any = None, **_: Any) -> Tensor:
    probability = input if p is None else p
    return _bernoulli_values(mode, "torch.bernoulli", input, probability)


def _multinomial(
    mode: KeyedRandomness, input: Tensor, num_samples: int, replacement: bool = False, **_: Any
) -> Tensor:
    probs = input / input.sum(-1, keepdim=True)
    if replacement:
        cdf = probs.cumsum(-1)
        u = _uniform(mode, "torch.multinomial", (*input.shape[:-1], num_samples), probs)
        cdf = cdf / cdf[..., -1:]
        return torch.searchsorted(cdf.contiguous(), u.contiguous(), right=True).clamp_max(
            input.shape[-1] - 1
        )
    if num_samples > input.shape[-1]:
        raise RuntimeError(
            f"torch.multinomial: cannot take {num_samples} samples without replacement from "
            f"{input.shape[-1]} categories"
        )
    # Gumbel-top-k: the k largest of log(p) + Gumbel noise are a draw without replacement.
    u = _uniform(mode, "torch.multinomial", input.shape, probs)
    gumbel = -torch.log(-torch.log1p(-u).clamp_max(-1e-30))
    scores = torch.where(probs > 0, torch.log(probs) + gumbel, float("-inf"))
    return scores.topk(num_samples, dim=-1).indices


def _mask_dropout(
    mode: KeyedRandomness,
    what: str,
    input: Tensor,
    p: float,
    channels: bool,
    alpha: bool,
    inplace: bool = False,
) -> Tensor:
    """torch's ``_dropout_impl``: the same arithmetic, the mask from the key."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
    if p == 0.0 or input.numel() == 0:
        return input
    if p == 1.0:
        return input.mul_(0) if inplace else input * torch.zeros_like(input)
    shape = (*input.shape[:2], *([1] * (input.dim() - 2))) if channels else input.shape
    noise = _bernoulli_values(
        mode, what, torch.empty(shape, dtype=input.dtype, device=input.device), 1.0 - p
    )
    if alpha:
        scale = 1.7580993408473766
        a = 1.0 / math.sqrt((scale * scale * p + 1) * (1 - p))
        b = (noise - 1) * (scale * a) + scale * a * p
        noise = noise * a
        return input.mul_(noise).add_(b) if inplace else input * noise + b
    noise = noise / (1.0 - p)
    return input.mul_(noise) if inplace else input * noise


def _dropout_fn(
    what: str,
    channels: bool,
    alpha: bool,
    batched_dim: int | None = None,
    default_training: bool = True,
) -> Callable[..., Tensor]:
    """A keyed ``F.dropout``-family function (``batched_dim``: the rank of a batched input,
    for ``dropout1d``/``dropout3d``, which add a batch axis to unbatched inputs)."""

    def dropout(
        mode: KeyedRandomness,
        input: Tensor,
        p: float = 0.5,
        training: bool = default_training,
        inplace: bool = False,
    ) -> Tensor:
        if not training:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
            return input
        if batched_dim is not None and input.dim() == batched_dim - 1:
            out = _mask_dropout(mode, what, input.unsqueeze(0), p, channels, alpha)
            return input.copy_(out.squeeze(0)) if inplace else out.squeeze(0)
        return _mask_dropout(mode, what, input, p, channels, alpha, inplace)

    return dropout


def _aten_dropout(what: str, channels: bool, alpha: bool, inplace: bool = False) -> Callable:
    """A keyed ``torch.dropout(input, p, train)``-family function."""

    def dropout(mode: KeyedRandomness, input: Tensor, p: float, train: bool) -> Tensor:
        return _mask_dropout(mode, what, input, p, channels, alpha, inplace) if train else input

    return dropout


def _native_dropout(mode: KeyedRandomness, input: Tensor, p: float, train: bool | None) -> tuple:
    if not train:
        return input, torch.ones_like(input, dtype=torch.bool)
    keep = _uniform(mode, "torch.native_dropout", input.shape, input) >= p
    scale = 0.0 if p == 1.0 else 1.0 / (1.0 - p)
    return input * keep * scale, keep


def _rrelu(
    mode: KeyedRandomness,
    input: Tensor,
    lower: float = 1.0 / 8,
    upper: float = 1.0 / 3,
    training: bool = False,
    inplace: bool = False,
    **_: Any,
) -> Tensor:
    if not training:
        slope = (lower + upper) / 2
        out = torch.where(input >= 0, input, input * slope)
    else:
        slope = lower + (upper - lower) * _uniform(mode, "rrelu", input.shape, input)
        out = torch.where(input >= 0, input, input * slope)
    return input.copy_(out) if inplace else out


def _rrelu_inplace(
    mode: KeyedRandomness,
    input: Tensor,
    lower: float = 1.0 / 8,
    upper: float = 1.0 / 3,
    training: bool = False,
    **_: Any,
) -> Tensor:
    return _rrelu(mode, input, lower, upper, training, inplace=True)


def _gumbel_softmax(
    mode: KeyedRandomness,
    logits: Tensor,
    tau: float = 1.0,
    hard: bool = False,
    eps: float = 1e-10,
    dim: int = -1,
) -> Tensor:
    # torch: -log(Exponential(1)) noise, a straight-through one-hot when hard.
    gumbels = -torch.log(_exponential_values(mode, "F.gumbel_softmax", logits))
    y_soft = ((logits + gumbels) / tau).softmax(dim)
    if not hard:
        return y_soft
    index = y_soft.max(dim, keepdim=True)[1]
    y_hard = torch.zeros_like(logits).scatter_(dim, index, 1.0)
    return y_hard - y_soft.detach() + y_soft


def _sdpa(
    mode: KeyedRandomness,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    if dropout_p == 0.0:
        return F.scaled_dot_product_attention(
            query,
            key,
            value,
            attn_mask=attn_mask,
            is_causal=is_causal,
            scale=scale,
            enable_gqa=enable_gqa,
        )
    # The reference math of torch's docs, with the attention-weight dropout keyed.
    length, source = query.shape[-2], key.shape[-2]
    factor = 1 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    bias = torch.zeros(length, source, dtype=query.dtype, device=query.device)
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        bias = bias.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        bias = (
            bias.masked_fill(~attn_mask, float("-inf"))
            if attn_mask.dtype == torch.bool
            else bias + attn_mask
        )
    weights = (query @ key.transpose(-2, -1) * factor + bias).softmax(-1)
    weights = _mask_dropout(
        mode, "F.scaled_dot_product_attention", weights, dropout_p, channels=False, alpha=False
    )
    return weights @ value


def _fractional_max_pool(func: Callable, dims: int) -> Callable[..., Any]:
    def pool(
        mode: KeyedRandomness,
        input: Tensor,
        *args: Any,
        _random_samples: Tensor | None = None,
        **kwargs: Any,
    ) -> Any:
        if _random_samples is None:
            batch = input.shape[0] if input.dim() == dims + 2 else 1
            channels = input.shape[-dims - 1]
            _random_samples = _uniform(mode, func.__name__, (batch, channels, dims), input)
        return func(input, *args, _random_samples=_random_samples, **kwargs)

    return pool


def _unkeyed(what: str, instead: str) -> Callable[..., Any]:
    def refuse(mode: KeyedRandomness, *args: Any, **kwargs: Any) -> Any:
        raise UnkeyedRandomnessError(
            f"{what} would draw from torch's global generator, and functorch_diary has no "
            f"keyed version of it; {instead}"
        )

    return refuse


def _mha(mode: KeyedRandomness, *args: Any, **kwargs: Any) -> Any:
    dropout_p = kwargs.get("dropout_p", args[10] if len(args) > 10 else 0.0)
    if kwargs.get("training", True) and dropout_p > 0.0:
        return _unkeyed(
            "nn.MultiheadAttention's attention dropout",
            "build it with dropout=0.0 and apply F.dropout to its output, or write the "
            "attention with F.scaled_dot_product_attention(dropout_p=...), which is keyed",
        )(mode)
    return F.multi_head_attention_forward(*args, **kwargs)


_REFUSE_SAMPLING = "draw it outside apply with your own torch.Generator and pass it in"

#: Every torch function answered from the key, with its keyed version.
KEYED_FUNCTIONS: dict[Callable, Callable[..., Any]] = {
    torch.rand: _factory(_uniform, "torch.rand"),
    torch.randn: _factory(_standard_normal, "torch.randn"),
    torch.rand_like: _like(_uniform, "torch.rand_like"),
    torch.randn_like: _like(_standard_normal, "torch.randn_like"),
    torch.randint: _randint,
    torch.randint_like: _randint_like,
    torch.randperm: _randperm,
    torch.normal: _normal,
    torch.bernoulli: _bernoulli,
    Tensor.bernoulli: _bernoulli,
    torch.multinomial: _multinomial,
    Tensor.multinomial: _multinomial,
    Tensor.uniform_: _in_place(_uniform_values, "Tensor.uniform_"),
    Tensor.normal_: _in_place(_normal_values, "Tensor.normal_"),
    Tensor.bernoulli_: _in_place(_bernoulli_values, "Tensor.bernoulli_"),
    Tensor.exponential_: _in_place(_exponential_values, "Tensor.exponential_"),
    Tensor.geometric_: _in_place(_geometric_values, "Tensor.geometric_"),
    Tensor.cauchy_: _in_place(_cauchy_values, "Tensor.cauchy_"),
    Tensor.log_normal_: _in_place(_log_normal_values, "Tensor.log_normal_"),
    Tensor.random_: _in_place(_random_values, "Tensor.random_"),
    F.dropout: _dropout_fn("F.dropout", channels=False, alpha=False),
    F.dropout1d: _dropout_fn("F.dropout1d", channels=True, alpha=False, batched_dim=3),
    F.dropout2d: _dropout_fn("F.dropout2d", channels=True, alpha=False),
    F.dropout3d: _dropout_fn("F.dropout3d", channels=True, alpha=False, batched_dim=5),
    F.alpha_dropout: _dropout_fn("F.alpha_dropout", False, True, default_training=False),
    F.feature_alpha_dropout: _dropout_fn(
        "F.feature_alpha_dropout", True, True, default_training=False
    ),
    torch.dropout: _aten_dropout("torch.dropout", channels=False, alpha=False),
    torch.dropout_: _aten_dropout("torch.dropout_", False, False, inplace=True),
    torch.feature_dropout: _aten_dropout("torch.feature_dropout", channels=True, alpha=False),
    torch.alpha_dropout: _aten_dropout("torch.alpha_dropout", channels=False, alpha=True),
    torch.feature_alpha_dropout: _aten_dropout("torch.feature_alpha_dropout", True, True),
    torch.native_dropout: _native_dropout,
    F.rrelu: _rrelu,
    F.rrelu_: _rrelu_inplace,
    torch.rrelu: _rrelu,
    torch.rrelu_: _rrelu_inplace,
    F.gumbel_softmax: _gumbel_softmax,
    F.scaled_dot_product_attention: _sdpa,
    F.fractional_max_pool2d: _fractional_max_pool(F.fractional_max_pool2d, 2),
    F.fractional_max_pool3d: _fractional_max_pool(F.fractional_max_pool3d, 3),
    F.fractional_max_pool2d_with_indices: _fractional_max_pool(
        F.fractional_max_pool2d_with_indices, 2
    ),
    F.fractional_max_pool3d_with_indices: _fractional_max_pool(
        F.fractional_max_pool3d_with_indices, 3
    ),
    F.multi_head_attention_forward: _mha,
    torch.poisson: _unkeyed("torch.poisson", _REFUSE_SAMPLING),
    torch.binomial: _unkeyed("torch.binomial", _REFUSE_SAMPLING),
}
# torch.distributions samples Gamma and Dirichlet through private kernels.
for _name, _what in (("_standard_gamma", "gamma sampling"), ("_sample_dirichlet", "Dirichlet")):
    if (_kernel := optional(torch, _name)) is not None:
        KEYED_FUNCTIONS[_kernel] = _unkeyed(f"{_what} (torch.distributions)", _REFUSE_SAMPLING)
