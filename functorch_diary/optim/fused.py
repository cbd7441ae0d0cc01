"""The eager CPU steps of SGD, Adam(W), Adagrad and RMSprop, written into fresh tensors.

``torch.optim`` updates params and state in place. A pure step cannot: it must write new
params and new state, and on a CPU writing to a second buffer costs several times an
in-place pass over the same data (a 2-core Xeon, one thread: ``torch.mul(x, c, out=y)``
over 45 MB takes 3.7x ``x.mul_(c)``). So the fewer passes a step makes, the better:

- SGD with momentum, Adam, AdamW and Adagrad copy params and state into fresh tensors and
  run torch's own fused CPU kernel (``torch._fused_sgd_``, ``_fused_adam_``, ``_fused_adamw_``,
  ``_fused_adagrad_``: what ``torch.optim.Adam(fused=True)`` runs) in place on the
  copies. Each element is then read and written once more, instead of once per
  ``foreach`` pass (Adam makes seven). The result is ``torch.optim``'s ``fused=True``
  step to the bit, and on ResNet-18's parameters Adam, AdamW and Adagrad take 0.7-0.9x
  the time of the in-place ``foreach=True`` step (``benchmarks/optimizer_update.py``).
- RMSprop has no fused kernel in torch; its step runs ``foreach``'s kernels leaf by leaf
  and builds the denominator in the tensor that becomes the new param, so that its last
  kernel (``addcdiv``) runs in place on memory the step owns. It is ``foreach=True``'s
  step to the bit.

The kernels index raw memory, so every tensor of a leaf must share the param's shape,
dtype and strides: :func:`runs_on` checks the first two, and gradients laid out
differently are copied into the param's layout. The callers (the ``update_and_apply`` of
:func:`~functorch_diary.optim.trace`, :func:`~functorch_diary.optim.scale_by_adam`,
:func:`~functorch_diary.optim.scale_by_rms` and :func:`~functorch_diary.optim.scale_by_rss`)
check first that this is plain eager code (:mod:`.fast_path`).
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from .._torch import FUSED_KERNELS

__all__ = ["adagrad", "adam", "in_place", "rmsprop", "runs_on", "sgd"]


def runs_on(params: Sequence[Tensor], *columns: Sequence[Tensor]) -> bool:
    """Whether these steps may run: on the CPU (on a GPU one ``foreach`` launch per pass
    is the fast path), with every leaf of every column (grads, state) shaped and typed
    like its param. Otherwise the caller takes the checked ``update`` path.

    Example:
        >>> import torch
        >>> runs_on([torch.ones(2)], [torch.ones(2)]), runs_on([torch.ones(2)], [torch.ones(3)])
        (True, False)
        >>> runs_on([torch.ones(1, device="meta")]), runs_on([])
        (False, False)
    """
    if not params or params[0].device.type != "cpu" or None in FUSED_KERNELS.values():
        return False
    if any(len(column) != len(params) for column in columns):
        return False
    return all(
        t.shape == p.shape and t.dtype == p.dtype and t.device == p.device
        for column in columns
        for t, p in zip(column, params, strict=True)
    )


#: Set by :func:`in_place`: the kernels write into the tensors they are given.
_IN_PLACE: contextvars.ContextVar[bool] = contextvars.ContextVar("fused_in_place", default=False)


def in_place(enabled: bool = True) -> contextlib.AbstractContextManager:
    """Within it, the steps of this module write their new params and state into the
    params and state they are given (laid out like the param) instead of into copies:
    ``torch.optim``'s in-place step, for a donated ``TrainState``
    (``make_train_step(..., donate=True)``) whose old values nobody reads again.

    ``in_place(False)`` restores copying inside it: a wrapper that still reads the old
    params after its inner step (``apply_if_finite`` keeps them on a skipped step) uses it.

    Example:
        >>> import torch
        >>> p = [torch.ones(1)]
        >>> with in_place():
        ...     new, _ = sgd(p, [torch.ones(1)], None, lr=0.5, momentum=0.0, dampening=0.0,
        ...         nesterov=False, weight_decay=0.0, first_step=True)
        >>> new[0] is p[0], p[0]
        (True, tensor([0.5000]))
    """
    if torch.compiler.is_compiling():
        # Traced code never reaches these kernels (fast_path), and Dynamo cannot trace a
        # ContextVar; the donating step's writes are input mutations of the graph instead.
        return contextlib.nullcontext()
    return _in_place(enabled)


@contextlib.contextmanager
def _in_place(enabled: bool) -> Iterator[None]:
    token = _IN_PLACE.set(enabled)
    try:
        yield
    finally:
        _IN_PLACE.reset(token)


def _copies(sources: Sequence[Tensor], params: Sequence[Tensor]) -> list[Tensor]:
    """Fresh copies of ``sources``, each laid out like its param; under :func:`in_place`,
    the sources themselves where they already are."""
    if _IN_PLACE.get():
        return [
            s if s.stride() == p.stride() else torch.empty_like(p).copy_(s)
            for s, p in zip(sources, params, strict=True)
        ]
    return [torch.empty_like(p).copy_(s) for s, p in zip(sources, params, strict=True)]


def _laid_out_like(grads: Sequence[Tensor], outputs: Sequence[Tensor]) -> list[Tensor]:
    """``grads``, with any whose strides differ from its output's copied into that layout
    (a channels-last param with a contiguous gradient, say)."""
    return [
        g if g.stride() == out.stride() else torch.empty_like(out).copy_(g)
        for g, out in zip(grads, outputs, strict=True)
    ]


def adam(
    params: list[Tensor],
    grads: list[Tensor],
    mu: list[Tensor],
    nu: list[Tensor],
    nu_max: list[Tensor] | None,
    *,
    b1: float,
    b2: float,
    eps: float,
    lr: float,
    step: int,
    weight_decay: float = 0.0,
) -> tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor] | None]:
    """One step of ``torch.optim.Adam`` (``AdamW`` with ``weight_decay``), ``fused=True``.

    Args:
        params, grads, mu, nu: leaf lists (``exp_avg``, ``exp_avg_sq``).
        nu_max: AMSGrad's ``max_exp_avg_sq``, or ``None`` without AMSGrad.
        b1, b2, eps, lr: torch's hyperparameters.
        step: the step being taken (1 on the first).
        weight_decay: AdamW's decoupled decay (0: Adam).

    Returns:
        New ``params``, ``mu``, ``nu`` and ``nu_max``; the inputs are not modified.

    Example:
        >>> import torch
        >>> p, m, v, _ = adam([torch.ones(2)], [torch.ones(2)], [torch.zeros(2)],
        ...     [torch.zeros(2)], None, b1=0.9, b2=0.999, eps=1e-8, lr=0.1, step=1)
        >>> p[0]
        tensor([0.9000, 0.9000])
    """
    new_params, new_mu, new_nu = _copies(params, params), _copies(mu, params), _copies(nu, params)
    new_max = _copies(nu_max, params) if nu_max is not None else []
    kernel = FUSED_KERNELS["adamw" if weight_decay else "adam"]
    kernel(
        new_params,
        _laid_out_like(grads, new_params),
        new_mu,
        new_nu,
        new_max,
        # An int64 step: the kernel reads it as one, exact where torch's float32 is not.
        [torch.tensor(step)] * len(params),
        lr=lr,
        beta1=b1,
        beta2=b2,
        weight_decay=weight_decay,
        eps=eps,
        amsgrad=nu_max is not None,
        maximize=False,
    )
    return new_params, new_mu, new_nu, new_max if nu_max is not None else None


def sgd(
    params: list[Tensor],
    grads: list[Tensor],
    buffers: list[Tensor] | None,
    *,
    lr: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    first_step: bool,
) -> tuple[list[Tensor], list[Tensor] | None]:
    """One step of ``torch.optim.SGD`` with momentum, ``fused=True``: weight decay, momentum
    and ``-lr`` in one kernel (``maximize`` comes before it, as its own stage).

    Args:
        params, grads: leaf lists.
        buffers: the momentum buffers, or ``None`` without momentum.
        lr, momentum, dampening, nesterov, weight_decay: torch's options.
        first_step: the buffers are new: the kernel sets them to the gradient.

    Returns:
        New ``params`` and ``buffers``; the inputs are not modified.

    Example:
        >>> import torch
        >>> p, b = sgd([torch.ones(1)], [torch.ones(1)], [torch.zeros(1)], lr=0.5,
        ...     momentum=0.9, dampening=0.0, nesterov=False, weight_decay=0.0, first_step=True)
        >>> p[0], b[0]
        (tensor([0.5000]), tensor([1.]))
    """
    new_params = _copies(params, params)
    new_buffers = _copies(buffers, params) if buffers is not None else []
    FUSED_KERNELS["sgd"](
        new_params,
        _laid_out_like(grads, new_params),
        new_buffers,
        weight_decay=weight_decay,
        momentum=momentum,
        lr=lr,
        dampening=dampening,
        nesterov=nesterov,
        maximize=False,
        is_first_step=first_step,
    )
    return new_params, new_buffers if buffers is not None else None


def adagrad(
    params: list[Tensor], grads: list[Tensor], sums: list[Tensor], *, eps: float, lr: float
) -> tuple[list[Tensor], list[Tensor]]:
    """One step of ``torch.optim.Adagrad``, ``fused=True``.

    Args:
        params, grads, sums: leaf lists (``sums`` is torch's ``sum``).
        eps: torch's eps.
        lr: the decayed learning rate of this step (torch's ``clr``).

    Returns:
        New ``params`` and ``sums``; the inputs are not modified.

    Example:
        >>> import torch
        >>> p, s = adagrad([torch.ones(1)], [torch.full((1,), 3.0)], [torch.zeros(1)],
        ...     eps=0.0, lr=0.5)
        >>> p[0], s[0]
        (tensor([0.5000]), tensor([9.]))
    """
    new_params, new_sums = _copies(params, params), _copies(sums, params)
    # lr_decay=0 makes the kernel's clr = lr / (1 + (step - 1) * 0) exactly lr: the decay
    # is already in ``lr``, so the step count does not matter.
    FUSED_KERNELS["adagrad"](
        new_params,
        _laid_out_like(grads, new_params),
        new_sums,
        [torch.tensor(1)] * len(params),
        lr=lr,
        lr_decay=0.0,
        weight_decay=0.0,
        eps=eps,
        maximize=False,
    )
    return new_params, new_sums


def rmsprop(
    params: list[Tensor],
    grads: list[Tensor],
    square_avg: list[Tensor],
    grad_avg: list[Tensor] | None,
    *,
    alpha: float,
    eps: float,
    lr: float,
) -> tuple[list[Tensor], list[Tensor], list[Tensor] | None]:
    """One step of ``torch.optim.RMSprop`` without momentum, ``foreach=True``.

    Args:
        params, grads, square_avg: leaf lists.
        grad_avg: the centered variant's running mean of gradients, or ``None``.
        alpha, eps, lr: torch's hyperparameters.

    Returns:
        New ``params``, ``square_avg`` and ``grad_avg``; the inputs are not modified.

    Example:
        >>> import torch
        >>> p, _, _ = rmsprop([torch.ones(1)], [torch.ones(1)], [torch.zeros(1)], None,
        ...     alpha=0.75, eps=0.0, lr=0.5)
        >>> p[0]
        tensor([0.])
    """
    new_params = [torch.empty_like(p) for p in params]
    new_square_avg = [torch.empty_like(p) for p in params]
    new_grad_avg = [torch.empty_like(p) for p in params] if grad_avg is not None else None
    for i, (p, g, v, p_out, v_out) in enumerate(
        zip(params, grads, square_avg, new_params, new_square_avg, strict=True)
    ):
        torch.mul(v, alpha, out=v_out)
        v_out.addcmul_(g, g, value=1 - alpha)
        # The denominator lives in p_out until addcdiv overwrites it with the new param,
        # reading each element before writing it: the last pass runs in place.
        avg = p_out
        if new_grad_avg is not None:
            mean_out = torch.lerp(grad_avg[i], g, 1 - alpha, out=new_grad_avg[i])
            torch.addcmul(v_out, mean_out, mean_out, value=-1, out=avg)
            avg.sqrt_()
        else:
            torch.sqrt(v_out, out=avg)
        avg.add_(eps)
        torch.addcdiv(p, g, avg, value=-lr, out=p_out)
    return new_params, new_square_avg, new_grad_avg
