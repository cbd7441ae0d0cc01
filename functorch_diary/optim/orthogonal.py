"""Muon: ``torch.optim.Muon``'s step (torch has no ``foreach`` one), for 2-D params only.

Muon orthogonalises each weight matrix's momentum by a bfloat16 Newton-Schulz iteration,
so it takes only matrices (as torch's does); give the other leaves (biases, norms,
embeddings, conv kernels) another optimiser with
:func:`~functorch_diary.optim.multi_transform`, as torch's docs advise with a second
optimiser. Muon is not element-wise, so it is not for ``make_ensemble_train_step``
(which steps all members' stacked leaves at once).

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> params = {"fc.weight": torch.eye(2), "fc.bias": torch.zeros(2)}
    >>> opt = optim.multi_transform(
    ...     {"muon": optim.muon(lr=0.02), "adamw": optim.adamw(lr=3e-4)},
    ...     {"muon": "fc.weight", "adamw": "fc.bias"})
    >>> state = opt.init(params)
    >>> optim.muon().init({"fc.bias": torch.zeros(2)})
    Traceback (most recent call last):
    ...
    ValueError: muon takes only 2-D params, but 'fc.bias' has shape (2,); ...
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, tree_flatten_with_paths, tree_leaves, tree_map
from .base import GradientTransformation, chain, zero_count
from .foreach_step import Number, fails, hyperparams_at, torch_step
from .shards import require_whole
from .transforms import ScalarOrSchedule, track_learning_rate

__all__ = ["ADJUST_LR_FNS", "MuonState", "muon", "zeropower_via_newtonschulz"]

#: torch's names for Muon's learning-rate adjustment by the matrix shape ``(A, B)``.
ADJUST_LR_FNS = (None, "original", "match_rms_adamw", "spectral_unclamped")


class MuonState(NamedTuple):
    """Muon's step count and momentum buffers."""

    count: Tensor
    momentum_buffer: PyTree


def zeropower_via_newtonschulz(
    grad: Tensor, ns_coefficients: tuple[float, float, float], ns_steps: int, eps: float
) -> Tensor:
    """torch's quintic Newton-Schulz orthogonalisation of a matrix, in bfloat16 (a new
    tensor; the input is not written to).

    Example:
        >>> zeropower_via_newtonschulz(torch.eye(2) * 5, (3.4445, -4.7750, 2.0315), 5, 1e-7).dtype
        torch.bfloat16
    """
    if ns_steps >= 100:
        raise ValueError("Number of steps must be less than 100 for computational efficiency")
    if len(grad.shape) != 2:
        raise ValueError("Input tensor gradient must be a 2D matrix")
    if len(ns_coefficients) != 3:
        raise ValueError("Coefficients must be a tuple of exactly 3 values")
    a, b, c = ns_coefficients
    ortho = grad.bfloat16()
    tall = grad.size(0) > grad.size(1)
    if tall:
        ortho = ortho.T
    # Out of place: bfloat16() returns a bfloat16 input itself, which torch then divides in
    # place (its momentum buffer, for bfloat16 params).
    ortho = ortho / ortho.norm().clamp(min=eps)
    for _ in range(ns_steps):
        gram = ortho @ ortho.T
        gram_update = torch.addmm(gram, gram, gram, beta=b, alpha=c)
        ortho = torch.addmm(ortho, gram_update, ortho, beta=a)
    return ortho.T if tall else ortho


def _adjust_lr(lr: Number, adjust_lr_fn: str | None, shape: torch.Size) -> Number:
    """torch's ``_adjust_lr``: the lr scaled by a function of the matrix shape ``(A, B)``."""
    rows, cols = shape[:2]
    if adjust_lr_fn is None or adjust_lr_fn == "original":
        ratio = math.sqrt(max(1, rows / cols))
    elif adjust_lr_fn == "match_rms_adamw":
        ratio = 0.2 * math.sqrt(max(rows, cols))
    else:  # "spectral_unclamped"
        ratio = math.sqrt(rows / cols)
    return lr * ratio


def _check_matrices(params: PyTree) -> None:
    if not tree_leaves(params):
        # Nothing to check; and Dynamo cannot flatten with paths a tree made inside a
        # compiled step (chain's init({}) when inject_hyperparams rebuilds muon there).
        return
    require_whole(params, "muon", "orthogonalises each whole 2-D matrix (Newton-Schulz)")
    for path, leaf in tree_flatten_with_paths(params):
        if isinstance(leaf, Tensor) and leaf.ndim != 2:
            raise ValueError(
                f"muon takes only 2-D params, but {path!r} has shape {tuple(leaf.shape)}; "
                "give it another optimiser (optim.multi_transform)"
            )
        if isinstance(leaf, Tensor) and leaf.is_complex():
            raise ValueError(f"muon does not support complex params, but {path!r} is {leaf.dtype}")


def muon(
    lr: ScalarOrSchedule = 1e-3,
    weight_decay: float = 0.1,
    momentum: float = 0.95,
    nesterov: bool = True,
    ns_coefficients: tuple[float, float, float] = (3.4445, -4.7750, 2.0315),
    eps: float = 1e-7,
    ns_steps: int = 5,
    adjust_lr_fn: str | None = None,
) -> GradientTransformation:
    """``torch.optim.Muon``: momentum (``lerp``), Nesterov, Newton-Schulz orthogonalisation,
    decoupled weight decay ``p * (1 - lr * wd)``, and a step ``-adjusted_lr * O``.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        weight_decay, momentum, nesterov, ns_coefficients, eps, ns_steps, adjust_lr_fn: as
            in ``torch.optim.Muon`` (``adjust_lr_fn`` one of :data:`ADJUST_LR_FNS`).

    Returns:
        The optimiser; its last state is a :class:`MuonState`.

    Raises:
        ValueError: a bad option, or (at ``init`` and at every step) a param that is not a
            2-D real matrix, naming its path.

    Example:
        >>> import torch
        >>> opt = muon(lr=0.1, weight_decay=0.0)
        >>> p = {"w": torch.zeros(2, 2)}
        >>> opt.update({"w": torch.eye(2)}, opt.init(p), p)[0]["w"].diagonal()
        tensor([-0.1125, -0.1125])
    """
    if not callable(lr) and fails(lr, lambda v: v >= 0.0):
        raise ValueError(f"Learning rate should be >= 0 but is: {lr}")
    if fails(momentum, lambda v: v >= 0.0):
        raise ValueError(f"momentum should be >= 0 but is: {momentum}")
    if fails(weight_decay, lambda v: v >= 0.0):
        raise ValueError(f"weight decay should be >= 0 but is: {weight_decay}")
    if adjust_lr_fn not in ADJUST_LR_FNS:
        raise ValueError(f"Adjust learning rate function {adjust_lr_fn} is not supported")

    def init(params: PyTree) -> MuonState:
        return MuonState(zero_count(params), tree_map(torch.zeros_like, params))

    def step(grads, params, state: MuonState, t: Number, lr: Number):
        beta, wd = hyperparams_at(t, momentum, weight_decay)
        new_params, buffers = [], []
        for p, g, buf in zip(params, grads, state.momentum_buffer, strict=True):
            # An injected (traced) momentum is a float64 tensor: lerp takes its leaf's dtype.
            weight = beta.to(buf.dtype) if isinstance(beta, Tensor) else beta
            buf = torch.lerp(buf, g, 1 - weight)
            update = g.lerp(buf, weight) if nesterov else buf
            update = zeropower_via_newtonschulz(update, ns_coefficients, ns_steps, eps)
            adjusted = _adjust_lr(lr, adjust_lr_fn, p.shape)
            if torch.is_tensor(lr):
                p = p * (1 - lr * wd).to(p.dtype)
                p = p + update.to(p.dtype) * (-adjusted).to(p.dtype)
            else:
                p = torch.add(p * (1 - lr * wd), update, alpha=-adjusted)
            new_params.append(p)
            buffers.append(buf)
        return new_params, MuonState(state.count, buffers)

    return chain(track_learning_rate(lr), torch_step("muon", init, step, lr, _check_matrices))
