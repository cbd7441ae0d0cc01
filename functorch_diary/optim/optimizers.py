"""Named optimisers: thin ``chain`` s of primitives that match ``torch.optim`` exactly.

Each takes the same arguments, with the same defaults, as its ``torch.optim`` twin;
``lr`` may also be a schedule ``step -> lr``. ``maximize=True`` negates the gradient
first, exactly where torch does. Eager on a CPU, :func:`~functorch_diary.optim.apply_gradients`
runs Adam, AdamW and Adagrad through torch's fused kernels (:mod:`.fused`) and folds the
last stage of the others into the new params.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> opt = optim.sgd(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
    >>> params = {"w": torch.ones(3)}
    >>> updates, state = opt.update({"w": torch.ones(3)}, opt.init(params), params)
    >>> optim.apply_updates(params, updates)["w"]
    tensor([0.8100, 0.8100, 0.8100])
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GradientTransformation, chain, learning_rate_at
from .transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    scale,
    scale_by_adam,
    scale_by_learning_rate,
    scale_by_rms,
    scale_by_rss,
    trace,
    track_learning_rate,
)

__all__ = ["adagrad", "adam", "adamw", "rmsprop", "sgd"]


def _maybe_negate(maximize: bool) -> list[GradientTransformation]:
    return [scale(-1.0)] if maximize else []


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.SGD``: weight decay, then momentum, then ``-lr``.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        momentum, dampening, nesterov, weight_decay, maximize: as in ``torch.optim.SGD``.

    Returns:
        The optimiser.

    Example:
        >>> import torch
        >>> opt = sgd(0.5, maximize=True)
        >>> p = {"w": torch.zeros(1)}
        >>> opt.update({"w": torch.ones(1)}, opt.init(p), p)[0]
        {'w': tensor([0.5000])}
    """
    # torch keeps no momentum buffer then; an injected momentum (a tensor, which may change
    # between steps, as torch's param_groups[0]['momentum'] may) always keeps one.
    if not isinstance(momentum, Tensor) and not (momentum or nesterov):
        return chain(
            *_maybe_negate(maximize),
            add_decayed_weights(weight_decay),
            scale_by_learning_rate(lr),
        )
    return chain(
        *_maybe_negate(maximize),
        track_learning_rate(lr),  # before the last stage, which fuses with the apply
        trace(momentum, dampening, nesterov, weight_decay=weight_decay, learning_rate=lr),
    )


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adam``: L2 weight decay added to the gradient, then Adam, then ``-lr``.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.Adam``.

    Returns:
        The optimiser.

    Example:
        >>> import torch
        >>> opt = adam(0.1, amsgrad=True)
        >>> p = {"w": torch.zeros(1)}
        >>> opt.update({"w": torch.ones(1)}, opt.init(p), p)[0]
        {'w': tensor([-0.1000])}
    """
    return chain(
        *_maybe_negate(maximize),
        add_decayed_weights(weight_decay),
        track_learning_rate(lr),  # before the last stage, which fuses with the apply
        scale_by_adam(*betas, eps, amsgrad=amsgrad, learning_rate=lr),
    )


def adamw(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
    *,
    amsgrad: bool = False,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.AdamW``: Adam with decoupled weight decay ``p -= lr * wd * p``.

    The decay is scaled by the (scheduled) learning rate and never enters the moments, as
    in torch; :func:`~functorch_diary.optim.apply_gradients` applies it as torch does,
    ``p * (1 - lr * wd)``, and ``update`` as the additive update ``-lr * wd * p``.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        betas, eps, weight_decay, amsgrad, maximize: as in ``torch.optim.AdamW``.

    Returns:
        The optimiser.

    Example:
        >>> import torch
        >>> opt = adamw(0.1, weight_decay=0.5)
        >>> p = {"w": torch.ones(1)}
        >>> opt.update({"w": torch.ones(1)}, opt.init(p), p)[0]
        {'w': tensor([-0.1500])}
    """
    return chain(
        *_maybe_negate(maximize),
        track_learning_rate(lr),
        scale_by_adam(
            *betas, eps, amsgrad=amsgrad, learning_rate=lr, decoupled_weight_decay=weight_decay
        ),
    )


def rmsprop(
    lr: ScalarOrSchedule = 1e-2,
    alpha: float = 0.99,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    momentum: float = 0.0,
    centered: bool = False,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.RMSprop`` (WGAN's optimiser): L2 decay, RMS scaling, momentum, ``-lr``.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        alpha, eps, weight_decay, momentum, centered, maximize: as in
            ``torch.optim.RMSprop``.

    Returns:
        The optimiser.

    Example:
        >>> import torch
        >>> opt = rmsprop(5e-5)  # the WGAN critic's optimiser
        >>> p = {"w": torch.zeros(1)}
        >>> opt.update({"w": torch.ones(1)}, opt.init(p), p)[0]
        {'w': tensor([-0.0005])}
    """
    stages = [*_maybe_negate(maximize), add_decayed_weights(weight_decay)]
    if not isinstance(momentum, Tensor) and momentum <= 0:  # injected: see sgd
        # The RMS stage holds the lr, so its addcdiv fuses with the apply, as in torch.
        fused = scale_by_rms(alpha, eps, centered, learning_rate=lr)
        return chain(*stages, track_learning_rate(lr), fused)
    # torch's momentum buffer starts at zero, so trace's "first buffer = input" is the same;
    # the RMS direction it gets is new.
    stages += [scale_by_rms(alpha, eps, centered), trace(momentum)]
    return chain(*stages, scale_by_learning_rate(lr))


def adagrad(
    lr: ScalarOrSchedule = 1e-2,
    lr_decay: float = 0.0,
    weight_decay: float = 0.0,
    initial_accumulator_value: float = 0.0,
    eps: float = 1e-10,
    *,
    maximize: bool = False,
) -> GradientTransformation:
    """``torch.optim.Adagrad``: L2 decay, sum-of-squares scaling, ``lr / (1 + t * lr_decay)``.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        lr_decay, weight_decay, initial_accumulator_value, eps, maximize: as in
            ``torch.optim.Adagrad``.

    Returns:
        The optimiser.

    Example:
        >>> import torch
        >>> opt = adagrad(0.5)
        >>> p = {"w": torch.zeros(1)}
        >>> opt.update({"w": torch.full((1,), 7.0)}, opt.init(p), p)[0]
        {'w': tensor([-0.5000])}
    """
    decayed_lr = lr
    if lr_decay != 0.0:
        # torch's clr = lr / (1 + (step - 1) * lr_decay), in float64 like its Python floats.
        def decayed_lr(count: Tensor) -> Tensor:
            return learning_rate_at(lr, count) / (1.0 + count.to(torch.float64) * lr_decay)

    return chain(
        *_maybe_negate(maximize),
        add_decayed_weights(weight_decay),
        track_learning_rate(lr),  # torch's param_groups lr is the undecayed one
        scale_by_rss(initial_accumulator_value, eps, learning_rate=decayed_lr),
    )
