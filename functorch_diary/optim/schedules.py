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
from typing import NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, tree_leaves, tree_map, tree_map_nodes
from .base import GradientTransformation
from .transforms import ScaleByLearningRateState, Schedule, scale_by_learning_rate

__all__ = [
    "PlateauConfig",
    "ReduceLROnPlateauState",
    "constant_lr",
    "cosine_annealing_lr",
    "cosine_annealing_warm_restarts",
    "cyclic_lr",
    "cyclic_momentum",
    "exponential_lr",
    "join_schedules",
    "lambda_lr",
    "linear_lr",
    "multiplicative_lr",
    "multistep_lr",
    "one_cycle_lr",
    "one_cycle_momentum",
    "polynomial_lr",
    "reduce_lr_on_plateau",
    "report_metric",
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
    """``MultiStepLR`` (CIFAR training's step decay): ``lr * gamma ** (milestones passed)``.

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
    """``PolynomialLR``, DeepLab's "poly" policy: ``lr * (1 - step / total_iters) ** power``,
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


def cosine_annealing_warm_restarts(
    lr: float, T_0: int, T_mult: int = 1, eta_min: float = 0.0
) -> Schedule:
    """``CosineAnnealingWarmRestarts`` (SGDR): a cosine from ``lr`` to ``eta_min`` over
    ``T_i`` steps, then a restart, with ``T_i = T_0 * T_mult ** (restarts so far)``.

    The restart points are whole numbers found by counting boundaries passed (a table made
    once), not by a float logarithm, so ``T_cur`` is torch's exactly.

    Example:
        >>> s = cosine_annealing_warm_restarts(1.0, T_0=2, T_mult=2)
        >>> [round(float(s(t)), 4) for t in range(7)]
        [1.0, 0.5, 1.0, 0.8536, 0.5, 0.1464, 1.0]
    """
    if T_0 < 1 or T_mult < 1 or int(T_mult) != T_mult:
        raise ValueError(f"T_0 must be >= 1 and T_mult an integer >= 1, got {T_0}, {T_mult}")
    # starts[k]: the step at which cycle k begins; lengths[k]: its length. Up to 2**62.
    starts, lengths = [0], [T_0]
    while T_mult > 1 and starts[-1] + lengths[-1] < 2**62:
        starts.append(starts[-1] + lengths[-1])
        lengths.append(lengths[-1] * T_mult)

    def schedule(step: Tensor | int) -> Tensor:
        t = torch.as_tensor(step).to(torch.int64)
        if T_mult == 1:
            t_cur, t_i = torch.remainder(t, T_0), torch.full_like(t, T_0)
        else:
            begins = torch.tensor(starts, dtype=torch.int64, device=t.device)
            cycle = (t >= begins).sum() - 1
            t_cur = t - begins[cycle]
            t_i = torch.tensor(lengths, dtype=torch.int64, device=t.device)[cycle]
        cosine = torch.cos(math.pi * t_cur.to(torch.float64) / t_i.to(torch.float64))
        return eta_min + (lr - eta_min) * (1.0 + cosine) / 2.0

    return schedule


def multiplicative_lr(lr: float, lr_lambda: Callable[[int], float], total_steps: int) -> Schedule:
    """``MultiplicativeLR``: ``lr * lr_lambda(1) * ... * lr_lambda(step)``.

    torch multiplies the lr by ``lr_lambda(epoch)`` at every ``scheduler.step()``, with a
    Python ``int`` epoch; that running product has no closed form for an arbitrary lambda.
    So the product is taken once, here, in Python floats as torch takes it, for the steps
    ``0 .. total_steps``, and the schedule looks it up (steps past ``total_steps`` keep the
    last value): torch's lrs to the bit, and a table lookup that compiles.

    Example:
        >>> s = multiplicative_lr(1.0, lambda epoch: 0.5, total_steps=3)
        >>> [float(s(t)) for t in range(4)]
        [1.0, 0.5, 0.25, 0.125]
    """
    values = [lr]
    for epoch in range(1, total_steps + 1):
        values.append(values[-1] * lr_lambda(epoch))

    def schedule(step: Tensor | int) -> Tensor:
        t = torch.as_tensor(step).to(torch.int64)
        table = torch.tensor(values, dtype=torch.float64, device=t.device)
        return table[torch.clamp(t, 0, total_steps)]

    return schedule


def _cyclic_scale(mode: str, gamma: float, scale_fn, scale_mode):
    """CyclicLR's amplitude factor ``scale_fn`` and what it is a function of."""
    if scale_fn is not None:
        return scale_fn, scale_mode
    if mode == "triangular":
        return (lambda x: torch.ones_like(x)), "cycle"
    if mode == "triangular2":
        return (lambda x: 1 / (2.0 ** (x - 1))), "cycle"
    if mode == "exp_range":
        return (lambda x: gamma**x), "iterations"
    raise ValueError(f"mode must be 'triangular', 'triangular2' or 'exp_range', got {mode!r}")


def _cyclic(
    low: float,
    high: float,
    step_size_up: int,
    step_size_down: int | None,
    mode: str,
    gamma: float,
    scale_fn: Callable[[Tensor], Tensor] | None,
    scale_mode: str,
    rising: bool,
) -> Schedule:
    """CyclicLR's value curve: from ``low`` up to ``high`` and back (``rising``, the lr), or
    from ``high`` down to ``low`` and back (the momentum)."""
    if scale_mode not in ("cycle", "iterations"):
        raise ValueError(f"scale_mode must be 'cycle' or 'iterations', got {scale_mode!r}")
    down = step_size_up if step_size_down is None else step_size_down
    total = float(step_size_up + down)
    ratio = step_size_up / total
    fn, fn_of = _cyclic_scale(mode, gamma, scale_fn, scale_mode)

    def schedule(step: Tensor | int) -> Tensor:
        t = _step(step)
        cycle = torch.floor(1 + t / total)
        x = 1.0 + t / total - cycle
        factor = torch.where(x <= ratio, x / ratio, (x - 1) / (ratio - 1))
        height = (high - low) * factor
        scale = fn(cycle if fn_of == "cycle" else t)
        return low + height * scale if rising else high - height * scale

    return schedule


def cyclic_lr(
    base_lr: float,
    max_lr: float,
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable[[Tensor], Tensor] | None = None,
    scale_mode: str = "cycle",
) -> Schedule:
    """``CyclicLR``: the lr cycles between ``base_lr`` and ``max_lr``, rising for
    ``step_size_up`` steps and falling for ``step_size_down`` (default: the same).

    Args:
        base_lr, max_lr, step_size_up, step_size_down, mode, gamma: as in torch
            (``mode``: ``"triangular"``, ``"triangular2"`` halving the amplitude each
            cycle, ``"exp_range"`` scaling it by ``gamma ** step``).
        scale_fn: a custom amplitude factor (replaces ``mode``), a function of a 0-dim
            float64 tensor written with tensor operations; ``scale_mode`` says whether it
            gets the cycle number (from 1) or the step.
        scale_mode: ``"cycle"`` or ``"iterations"``.

    :func:`cyclic_momentum` is the momentum torch cycles with it (``cycle_momentum``).

    Example:
        >>> s = cyclic_lr(0.1, 1.0, step_size_up=2)
        >>> [round(float(s(t)), 2) for t in range(5)]
        [0.1, 0.55, 1.0, 0.55, 0.1]
    """
    return _cyclic(
        base_lr, max_lr, step_size_up, step_size_down, mode, gamma, scale_fn, scale_mode, True
    )


def cyclic_momentum(
    base_momentum: float = 0.8,
    max_momentum: float = 0.9,
    step_size_up: int = 2000,
    step_size_down: int | None = None,
    mode: str = "triangular",
    gamma: float = 1.0,
    scale_fn: Callable[[Tensor], Tensor] | None = None,
    scale_mode: str = "cycle",
) -> Schedule:
    """The momentum (or Adam's ``beta1``) ``CyclicLR(cycle_momentum=True)`` sets: it falls
    from ``max_momentum`` to ``base_momentum`` while the lr rises, and back.

    Example:
        >>> s = cyclic_momentum(0.8, 0.9, step_size_up=2)
        >>> [round(float(s(t)), 2) for t in range(5)]
        [0.9, 0.85, 0.8, 0.85, 0.9]
    """
    return _cyclic(
        base_momentum,
        max_momentum,
        step_size_up,
        step_size_down,
        mode,
        gamma,
        scale_fn,
        scale_mode,
        False,
    )


def _one_cycle(
    total_steps: int,
    pct_start: float,
    anneal_strategy: str,
    three_phase: bool,
    values: tuple[float, float, float, float],
) -> Schedule:
    """OneCycleLR's piecewise anneal through ``values`` = (start, peak, back, end): two
    phases start -> peak -> end, or three start -> peak -> back -> end."""
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    if total_steps < 1 or not 0 <= pct_start <= 1:
        raise ValueError(
            f"need total_steps >= 1 and 0 <= pct_start <= 1, got {total_steps}, {pct_start}"
        )
    start, peak, back, end = values
    if three_phase:
        ends = [float(pct_start * total_steps) - 1, float(2 * pct_start * total_steps) - 2]
        phases = [(start, peak), (peak, back), (back, end)]
    else:
        ends = [float(pct_start * total_steps) - 1]
        phases = [(start, peak), (peak, end)]
    ends.append(total_steps - 1)
    begins = [0.0, *ends[:-1]]
    if any(e <= b for b, e in zip(begins, ends, strict=True)):
        raise ValueError(
            f"pct_start={pct_start} of total_steps={total_steps} leaves a phase of no steps "
            f"(phase ends {ends}); raise pct_start or total_steps"
        )

    def anneal(a: float, b: float, pct: Tensor) -> Tensor:
        if anneal_strategy == "cos":
            return b + (a - b) / 2.0 * (torch.cos(math.pi * pct) + 1)
        return (b - a) * pct + a

    def schedule(step: Tensor | int) -> Tensor:
        t = _step(step)
        # The last phase, then each earlier one where its end has not passed: torch's loop.
        value = anneal(*phases[-1], (t - begins[-1]) / (ends[-1] - begins[-1]))
        for i in reversed(range(len(phases) - 1)):
            here = anneal(*phases[i], (t - begins[i]) / (ends[i] - begins[i]))
            value = torch.where(t <= ends[i], here, value)
        return value

    return schedule


def one_cycle_lr(
    max_lr: float,
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    div_factor: float = 25.0,
    final_div_factor: float = 1e4,
    three_phase: bool = False,
) -> Schedule:
    """``OneCycleLR``: from ``max_lr / div_factor`` up to ``max_lr`` over ``pct_start`` of
    ``total_steps``, then down to ``initial / final_div_factor`` (``three_phase``: back to
    the initial lr first, then down), by cosine or linear anneal.

    :func:`one_cycle_momentum` is the momentum (or ``beta1``) torch cycles with it.

    Example:
        >>> s = one_cycle_lr(1.0, total_steps=10, anneal_strategy="linear", div_factor=10)
        >>> [round(float(s(t)), 6) for t in (0, 2, 9)]
        [0.1, 1.0, 1e-05]
    """
    initial = max_lr / div_factor
    values = (initial, max_lr, initial, initial / final_div_factor)
    return _one_cycle(total_steps, pct_start, anneal_strategy, three_phase, values)


def one_cycle_momentum(
    total_steps: int,
    pct_start: float = 0.3,
    anneal_strategy: str = "cos",
    base_momentum: float = 0.85,
    max_momentum: float = 0.95,
    three_phase: bool = False,
) -> Schedule:
    """The momentum (or Adam's ``beta1``) ``OneCycleLR(cycle_momentum=True)`` sets: from
    ``max_momentum`` down to ``base_momentum`` while the lr rises, and back up.

    Example:
        >>> s = one_cycle_momentum(10, anneal_strategy="linear")
        >>> [round(float(s(t)), 4) for t in (0, 2, 9)]
        [0.95, 0.85, 0.95]
    """
    values = (max_momentum, base_momentum, max_momentum, max_momentum)
    return _one_cycle(total_steps, pct_start, anneal_strategy, three_phase, values)


class PlateauConfig(NamedTuple):
    """:func:`reduce_lr_on_plateau`'s hyperparameters, as 0-dim tensors in its state (so
    :func:`report_metric` needs nothing but the state, and a checkpoint holds them)."""

    minimize: Tensor
    relative: Tensor
    factor: Tensor
    patience: Tensor
    threshold: Tensor
    cooldown: Tensor
    min_lr: Tensor
    eps: Tensor


class ReduceLROnPlateauState(NamedTuple):
    """The lr (a :class:`ScaleByLearningRateState`, so :func:`current_lr` finds it), the
    best metric so far, the epochs without improvement, the cooldown left, the config."""

    lr: ScaleByLearningRateState
    best: Tensor
    num_bad_epochs: Tensor
    cooldown_counter: Tensor
    config: PlateauConfig


def reduce_lr_on_plateau(
    lr: float,
    mode: str = "min",
    factor: float = 0.1,
    patience: int = 10,
    threshold: float = 1e-4,
    threshold_mode: str = "rel",
    cooldown: int = 0,
    min_lr: float = 0.0,
    eps: float = 1e-8,
) -> GradientTransformation:
    """``ReduceLROnPlateau``: multiply updates by ``-lr``, where ``lr`` drops by ``factor``
    once the monitored metric has not improved for ``patience`` epochs.

    The metric-driven twin of torch's scheduler, as ``optax.contrib.reduce_on_plateau``:
    the lr lives in the state, and :func:`report_metric` (torch's ``scheduler.step(metric)``,
    once an epoch) returns the state after seeing a metric. Use it as the last stage of a
    chain, e.g. ``chain(trace(0.9), reduce_lr_on_plateau(0.1))`` for SGD with momentum.

    Args:
        lr: the initial learning rate.
        mode, factor, patience, threshold, threshold_mode, cooldown, min_lr, eps: as in
            ``torch.optim.lr_scheduler.ReduceLROnPlateau``.

    Returns:
        A transformation whose state is a :class:`ReduceLROnPlateauState`.

    Example:
        >>> import torch
        >>> opt = reduce_lr_on_plateau(1.0, patience=0)
        >>> state = opt.init({"w": torch.zeros(1)})
        >>> state = report_metric(report_metric(state, 3.0), 3.0)  # no better: lr drops
        >>> float(state.lr.lr), opt.update({"w": torch.ones(1)}, state)[0]
        (0.1, {'w': tensor([-0.1000])})
    """
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
    if threshold_mode not in ("rel", "abs"):
        raise ValueError(f"threshold_mode must be 'rel' or 'abs', got {threshold_mode!r}")
    if factor >= 1.0:
        raise ValueError(f"factor must be < 1.0, got {factor}")
    lr_stage = scale_by_learning_rate(lr)

    def init(params: PyTree) -> ReduceLROnPlateauState:
        lr_state = lr_stage.init(params)

        def value(x: float | bool, dtype: torch.dtype = torch.float64) -> Tensor:
            return torch.tensor(x, dtype=dtype, device=lr_state.count.device)

        config = PlateauConfig(
            value(mode == "min", torch.bool),
            value(threshold_mode == "rel", torch.bool),
            value(factor),
            value(patience, torch.int64),
            value(threshold),
            value(cooldown, torch.int64),
            value(min_lr),
            value(eps),
        )
        worst = math.inf if mode == "min" else -math.inf
        zero = value(0, torch.int64)
        return ReduceLROnPlateauState(lr_state, value(worst), zero, zero.clone(), config)

    def update(updates: PyTree, state: ReduceLROnPlateauState, params: PyTree | None = None):
        leaves = tree_leaves(updates)
        count = state.lr.count + 1
        new_state = state._replace(lr=state.lr._replace(count=count))
        if not leaves:
            return updates, new_state
        factor_now = (-state.lr.lr).to(leaves[0].dtype)
        return tree_map(lambda u: u * factor_now, updates), new_state

    return GradientTransformation(init, update)


def report_metric(opt_state: PyTree, metric: float | Tensor) -> PyTree:
    """``scheduler.step(metric)`` for every :func:`reduce_lr_on_plateau` in ``opt_state``:
    the new optimiser state (nothing modified), following torch's rules exactly.

    Tensor arithmetic with ``torch.where``, no branch on the metric, so it compiles.

    Example:
        >>> import torch
        >>> state = reduce_lr_on_plateau(0.5, mode="max").init({})
        >>> float(report_metric(state, 2.0).best)
        2.0
    """

    def step(state: ReduceLROnPlateauState) -> ReduceLROnPlateauState:
        c = state.config
        current = torch.as_tensor(metric, dtype=torch.float64, device=state.best.device)
        best = state.best
        rel_better = torch.where(
            c.minimize, current < best * (1.0 - c.threshold), current > best * (c.threshold + 1.0)
        )
        abs_better = torch.where(
            c.minimize, current < best - c.threshold, current > best + c.threshold
        )
        better = torch.where(c.relative, rel_better, abs_better)
        best = torch.where(better, current, best)
        bad = torch.where(better, 0, state.num_bad_epochs + 1)
        in_cooldown = state.cooldown_counter > 0
        cooldown_counter = torch.where(
            in_cooldown, state.cooldown_counter - 1, state.cooldown_counter
        )
        bad = torch.where(in_cooldown, 0, bad)
        reduce = bad > c.patience
        old = state.lr.lr
        new = torch.maximum(old * c.factor, c.min_lr)
        lr = torch.where(reduce & (old - new > c.eps), new, old)
        return ReduceLROnPlateauState(
            state.lr._replace(lr=lr),
            best,
            torch.where(reduce, 0, bad),
            torch.where(reduce, c.cooldown, cooldown_counter),
            c,
        )

    return tree_map_nodes(step, opt_state, ReduceLROnPlateauState)
