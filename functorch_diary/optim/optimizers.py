"""Named optimisers: thin ``chain`` s of primitives that match ``torch.optim`` exactly.

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

from .base import GradientTransformation, chain
from .transforms import (
    ScalarOrSchedule,
    add_decayed_weights,
    scale_by_adam,
    scale_by_learning_rate,
    trace,
)

__all__ = ["sgd", "adam"]


def sgd(
    lr: ScalarOrSchedule,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """``torch.optim.SGD``: weight decay, then momentum, then ``-lr``.

    Args:
        lr: learning rate, or a schedule ``step -> lr``.
        momentum, dampening, nesterov, weight_decay: as in ``torch.optim.SGD``.
    """
    stages = [add_decayed_weights(weight_decay)]
    if momentum != 0.0:
        stages.append(trace(momentum, dampening, nesterov))
    elif nesterov:
        raise ValueError("Nesterov momentum requires a momentum and zero dampening")
    return chain(*stages, scale_by_learning_rate(lr))


def adam(
    lr: ScalarOrSchedule = 1e-3,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> GradientTransformation:
    """``torch.optim.Adam``: L2 weight decay added to the gradient, then Adam, then ``-lr``."""
    return chain(
        add_decayed_weights(weight_decay), scale_by_adam(*betas, eps), scale_by_learning_rate(lr)
    )
