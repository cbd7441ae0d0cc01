"""Learning-rate schedules as pure ``step -> lr`` functions, after ``torch.optim.lr_scheduler``.

A torch scheduler mutates ``optimizer.param_groups[i]['lr']`` each time ``.step()`` is
called; here a schedule is a closed-form function of the step count (0 for the first
update), written with tensor arithmetic only, so ``torch.compile`` traces it once and
never re-traces as the step grows. Pass one as any optimiser's ``lr``: the optimiser
counts the steps and exposes the next lr through :func:`~functorch_diary.optim.current_lr`.

``schedule(t)`` equals the lr torch uses after ``t`` calls of ``scheduler.step()`` (one
per optimiser step). For per-epoch schedules, feed the epoch:
``lambda step: schedule(step // steps_per_epoch)``.

Every schedule returns a 0-dim float64 tensor on the step's device (torch computes its
learning rates in Python floats, i.e. float64).

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> schedule = optim.multistep_lr(0.1, milestones=[2, 4], gamma=0.1)
    >>> [round(float(schedule(torch.tensor(t))), 6) for t in range(6)]
    [0.1, 0.1, 0.01, 0.01, 0.001, 0.001]
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .transforms import Schedule

__all__ = [
    "constant_lr",
    "cosine_annealing_lr",
    "exponential_lr",
    "join_schedules",
    "lambda_lr",
    "linear_lr",
    "multistep_lr",
    "polynomial_lr",
    "step_lr",
]


def _step(step: Tensor | int) -> Tensor:
    return torch.as_tensor(step).to(torch.float64)


def constant_lr(lr: float, factor: float = 1.0 / 3, total_iters: int = 5) -> Schedule:
    """``ConstantLR``: ``lr * factor`` for the first ``total_iters`` steps, then ``lr``.

    Example:
        >>> [float(constant_lr(0.3, factor=0.5, total_iters=1)(t)) for t in range(2)]
        [0.15, 0.3]
    """

    def schedule(step: Tensor | int) -> Tensor:
        t = _step(step)
        # The factor as a float64 tensor: torch.where on two Python floats gives float32.
        scaled = torch.full_like(t, factor)
        return lr * torch.where(t < total_iters, scaled, 1.0)

    return schedule


def step_lr(lr: float, step_size: int, gamma: float = 0.1) -> Schedule:
    """``StepLR``: ``lr * gamma ** (step // step_size)``.

    Args:
        lr: the initial learning rate.
        step_size: steps between decays.
        gamma: the decay factor.

    Returns:
        The schedule.

    Example:
        >>> [float(step_lr(1.0, step_size=2, gamma=0.5)(t)) for t in range(5)]
        [1.0, 1.0, 0.5, 0.5, 0.25]
    """

    def schedule(step: Tensor | int) -> Tensor:
        return lr * gamma ** torch.div(_step(step), step_size, rounding_mode="floor")

    return schedule


def multistep_lr(lr: float, milestones: Sequence[int], gamma: float = 0.1) -> Schedule:
    """``MultiStepLR`` (seed 000's schedule): ``lr * gamma ** (milestones passed)``.

    Args:
        lr: the initial learning rate.
        milestones: the steps at which the lr is multiplied by ``gamma`` (a repeated
            milestone decays twice, as in torch).
        gamma: the decay factor.

    Returns:
        The schedule.

    Example:
        >>> [float(multistep_lr(1.0, milestones=[1, 3], gamma=0.5)(t)) for t in range(4)]
        [1.0, 0.5, 0.5, 0.25]
    """
    points = sorted(int(m) for m in milestones)

    def schedule(step: Tensor | int) -> Tensor:
        t = _step(step)
        passed = (t >= torch.tensor(points, dtype=torch.float64, device=t.device)).sum()
        return lr * gamma ** passed.to(torch.float64)

    return schedule


def lambda_lr(lr: float, lr_lambda: Callable[[Tensor], Tensor | float]) -> Schedule:
    """``LambdaLR``: ``lr * lr_lambda(step)``.

    Args:
        lr: the initial learning rate.
        lr_lambda: the factor as a function of the step, which arrives as a 0-dim
            float64 tensor holding a whole number (float64 so that ``0.05 * step`` keeps
            torch's Python-float precision); write it with tensor operations
            (``0.95 ** step``, ``torch.clamp(...)``) so that it compiles.

    Returns:
        The schedule.

    A Python-float factor (``math.*`` of the step, ``int(step)``, constants) keeps
    Python-float precision: the lr is ``LambdaLR``'s to the bit.

    Example:
        >>> [float(lambda_lr(2.0, lambda step: 0.5 ** step)(t)) for t in range(3)]
        [2.0, 1.0, 0.5]
        >>> float(lambda_lr(0.1, lambda step: 0.3)(0)) == 0.1 * 0.3
        True
    """

    def schedule(step: Tensor | int) -> Tensor:
        t = _step(step)
        # A Python-float factor becomes float64 (as_tensor alone would round it to float32):
        # lr * factor is then the Python product torch's LambdaLR computes, to the bit.
        factor = lr_lambda(t)
        if isinstance(factor, Tensor):
            return lr * factor.to(torch.float64)
        return lr * torch.tensor(factor, dtype=torch.float64, device=t.device)

    return schedule


def exponential_lr(lr: float, gamma: float) -> Schedule:
    """``ExponentialLR``: ``lr * gamma ** step``.

    Example:
        >>> [float(exponential_lr(1.0, gamma=0.5)(t)) for t in range(3)]
        [1.0, 0.5, 0.25]
    """

    def schedule(step: Tensor | int) -> Tensor:
        return lr * gamma ** _step(step)

    return schedule


def cosine_annealing_lr(lr: float, T_max: int, eta_min: float = 0.0) -> Schedule:
    """``CosineAnnealingLR``: ``eta_min + (lr - eta_min) * (1 + cos(pi * step / T_max)) / 2``.

    Past ``T_max`` the lr climbs back along the cosine, as torch's does.

    Example:
        >>> [round(float(cosine_annealing_lr(1.0, T_max=2)(t)), 6) for t in range(4)]
        [1.0, 0.5, 0.0, 0.5]
    """

    def schedule(step: Tensor | int) -> Tensor:
        cosine = torch.cos(math.pi * _step(step) / T_max)
        return eta_min + (lr - eta_min) * (1.0 + cosine) / 2.0

    return schedule


def linear_lr(
    lr: float, start_factor: float = 1.0 / 3, end_factor: float = 1.0, total_iters: int = 5
) -> Schedule:
    """``LinearLR``, the linear warmup: the factor goes linearly from ``start_factor`` to
    ``end_factor`` over ``total_iters`` steps, then stays.

    Example:
        >>> [float(linear_lr(1.0, start_factor=0.5, total_iters=2)(t)) for t in range(4)]
        [0.5, 0.75, 1.0, 1.0]
    """

    def schedule(step: Tensor | int) -> Tensor:
        progress = torch.clamp(_step(step), max=total_iters) / total_iters
        return lr * (start_factor + (end_factor - start_factor) * progress)

    return schedule


def polynomial_lr(lr: float, total_iters: int = 5, power: float = 1.0) -> Schedule:
    """``PolynomialLR``, seed 004's "poly" policy: ``lr * (1 - step / total_iters) ** power``,
    0 from ``total_iters`` on.

    Example:
        >>> [float(polynomial_lr(1.0, total_iters=2, power=2.0)(t)) for t in range(4)]
        [1.0, 0.25, 0.0, 0.0]
    """

    def schedule(step: Tensor | int) -> Tensor:
        progress = torch.clamp(_step(step), max=total_iters) / total_iters
        return lr * (1.0 - progress) ** power

    return schedule


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[int]) -> Schedule:
    """``SequentialLR``: ``schedules[i]`` from ``boundaries[i-1]`` on, restarted at step 0.

    Args:
        schedules: ``n`` schedules.
        boundaries: ``n - 1`` increasing steps (torch's ``milestones``).

    Returns:
        The joined schedule. Every part is evaluated and one is picked with
        ``torch.where``: no branch on the step, so it compiles.

    Example:
        >>> warmup = linear_lr(1.0, start_factor=0.5, total_iters=2)
        >>> joined = join_schedules([warmup, step_lr(1.0, 1, gamma=0.5)], boundaries=[2])
        >>> [float(joined(t)) for t in range(5)]
        [0.5, 0.75, 1.0, 0.5, 0.25]
    """
    if len(schedules) != len(boundaries) + 1:
        raise ValueError(
            f"join_schedules needs one boundary fewer than schedules: got {len(schedules)} "
            f"schedules and {len(boundaries)} boundaries"
        )
    if list(boundaries) != sorted(boundaries):
        raise ValueError(f"boundaries must increase, got {list(boundaries)}")

    def schedule(step: Tensor | int) -> Tensor:
        t = torch.as_tensor(step)
        value = schedules[0](t)
        for start, part in zip(boundaries, schedules[1:], strict=True):
            value = torch.where(t >= start, part(t - start), value)
        return value

    return schedule
