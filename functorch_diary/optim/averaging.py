"""Weight averaging, after ``torch.optim.swa_utils``: ``AveragedModel``, ``SWALR``, ``update_bn``.

``AveragedModel`` keeps a deep copy of a module and overwrites it in place on every
``update_parameters(model)``. Here the average is a value, an :class:`AverageState` of
params, state and the ``n_averaged`` counter, and :func:`averaged_model` returns two pure
functions: ``init(params, state)`` and ``update(average, params, state) -> average``.
The first update copies the params, as torch's does; later ones apply the averaging
function: the running mean by default (SWA), an exponential moving average with
``multi_avg_fn=ema_multi_avg_fn(decay)`` (EMA), or any pure function of your own.
Evaluate the averaged model with ``model.apply(average.params, average.state, x)``.

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> ema = optim.averaged_model(multi_avg_fn=optim.ema_multi_avg_fn(decay=0.5))
    >>> average = ema.init({"w": torch.zeros(1)})
    >>> for value in (4.0, 8.0):
    ...     average = ema.update(average, {"w": torch.tensor([value])})
    >>> average.params["w"], int(average.n_averaged)
    (tensor([6.]), 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .. import prng
from ..model.core import Model, State
from ..tree import Params, tree_flatten_with_paths, tree_map, tree_unflatten_like
from .transforms import Schedule

__all__ = [
    "AverageState",
    "Averager",
    "AvgFn",
    "MultiAvgFn",
    "averaged_model",
    "ema_avg_fn",
    "ema_multi_avg_fn",
    "swa_avg_fn",
    "swa_lr",
    "swa_multi_avg_fn",
    "update_bn",
]

#: ``(averaged, current, n_averaged) -> new averaged`` for one tensor (torch's ``avg_fn``).
AvgFn = Callable[[Tensor, Tensor, Tensor], Tensor]
#: The same over lists of one device and dtype (torch's ``multi_avg_fn``), returning new
#: tensors: torch's own multi functions write in place, these must not.
MultiAvgFn = Callable[[list[Tensor], list[Tensor], Tensor], list[Tensor]]

# torch.utils._foreach_utils._get_foreach_kernels_supported_devices(), without the private
# import (tests/optim/test_averaging.py pins the two together): where AveragedModel's
# default mean runs foreach lerp instead of avg + (x - avg) / (n + 1).
FOREACH_DEVICES = ("cuda", "xpu")
# torch's update_bn resets every _BatchNorm; these are its public subclasses (the lazy ones
# become BatchNorm1d/2d/3d once materialised), pinned by the same test.
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)


def ema_avg_fn(decay: float = 0.999) -> AvgFn:
    """``get_ema_avg_fn(decay)``: ``decay * averaged + (1 - decay) * current``.

    Example:
        >>> import torch
        >>> ema_avg_fn(0.9)(torch.tensor(1.0), torch.tensor(2.0), torch.tensor(3))
        tensor(1.1000)
    """

    def avg(averaged: Tensor, current: Tensor, n_averaged: Tensor) -> Tensor:
        return decay * averaged + (1 - decay) * current

    return avg


def ema_multi_avg_fn(decay: float = 0.999) -> MultiAvgFn:
    """``get_ema_multi_avg_fn(decay)``: one foreach ``lerp`` toward the current values by
    ``1 - decay`` (integer tensors: ``averaged * decay + current * (1 - decay)``, truncated
    back to their dtype, as torch's ``copy_`` does).

    Example:
        >>> import torch
        >>> ema_multi_avg_fn(0.75)([torch.tensor([0.0])], [torch.tensor([4.0])], torch.tensor(1))
        [tensor([1.])]
    """

    def avg(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> list[Tensor]:
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            return list(torch._foreach_lerp(averaged, current, 1 - decay))
        return [
            (a * decay + c * (1 - decay)).to(a.dtype)
            for a, c in zip(averaged, current, strict=True)
        ]

    return avg


def swa_avg_fn() -> AvgFn:
    """``get_swa_avg_fn()``, the running mean: ``averaged + (current - averaged) / (n + 1)``.

    Example:
        >>> import torch
        >>> swa_avg_fn()(torch.tensor(1.0), torch.tensor(4.0), torch.tensor(2))
        tensor(2.)
    """

    def avg(averaged: Tensor, current: Tensor, n_averaged: Tensor) -> Tensor:
        return averaged + (current - averaged) / (n_averaged + 1)

    return avg


def swa_multi_avg_fn() -> MultiAvgFn:
    """``get_swa_multi_avg_fn()``: the running mean as a foreach ``lerp`` by ``1 / (n + 1)``
    (integer tensors: :func:`swa_avg_fn` truncated to their dtype, where torch's raises).

    Example:
        >>> import torch
        >>> swa_multi_avg_fn()([torch.tensor([1.0])], [torch.tensor([4.0])], torch.tensor(2))
        [tensor([2.])]
    """

    def avg(averaged: list[Tensor], current: list[Tensor], n_averaged: Tensor) -> list[Tensor]:
        if torch.is_floating_point(averaged[0]) or torch.is_complex(averaged[0]):
            return list(torch._foreach_lerp(averaged, current, 1 / (n_averaged + 1)))
        # torch's addcdiv raises for integer tensors (num_batches_tracked with
        # use_buffers=True); this is the mean its per-tensor path truncates to.
        mean = swa_avg_fn()
        return [mean(a, c, n_averaged).to(a.dtype) for a, c in zip(averaged, current, strict=True)]

    return avg


class AverageState(NamedTuple):
    """The averaged model: ``params``, ``state`` (buffers) and how many models it holds."""

    params: Params
    state: State
    n_averaged: Tensor


class Averager(NamedTuple):
    """``init(params, state=None) -> AverageState`` and ``update(average, params,
    state=None) -> AverageState``: the pure ``AveragedModel``."""

    init: Callable[..., AverageState]
    update: Callable[..., AverageState]


def _copy(leaf: Tensor, device: torch.device) -> Tensor:
    return leaf.detach().to(device, copy=True)


def averaged_model(
    *,
    avg_fn: AvgFn | None = None,
    multi_avg_fn: MultiAvgFn | None = None,
    use_buffers: bool = False,
    device: torch.device | str | None = None,
) -> Averager:
    """The pure ``torch.optim.swa_utils.AveragedModel(model, device, avg_fn, multi_avg_fn,
    use_buffers)``.

    Args:
        avg_fn: averages one tensor at a time (:func:`ema_avg_fn`, :func:`swa_avg_fn`).
        multi_avg_fn: averages the leaves of one device and dtype together
            (:func:`ema_multi_avg_fn`, :func:`swa_multi_avg_fn`). Neither given: the
            running mean, as torch computes it on that device (foreach ``lerp`` on CUDA,
            :func:`swa_avg_fn` on the CPU).
        use_buffers: average the state (BatchNorm statistics, ``num_batches_tracked``
            included) like the params; ``False`` copies the current state on every update.
        device: where the average lives (default: where the first param is).

    Returns:
        An :class:`Averager`. The first ``update`` copies the params (and state), later
        ones average; ``n_averaged`` counts the updates.

    Raises:
        ValueError: both ``avg_fn`` and ``multi_avg_fn`` given.
    """
    if avg_fn is not None and multi_avg_fn is not None:
        raise ValueError("averaged_model takes avg_fn or multi_avg_fn, not both")

    def init(params: Params, state: State | None = None) -> AverageState:
        first = next(iter(params.values()), None)
        where = (
            torch.device(device)
            if device is not None
            else (first.device if first is not None else torch.device("cpu"))
        )
        return AverageState(
            tree_map(lambda p: _copy(p, where), params),
            tree_map(lambda b: _copy(b, where), dict(state or {})),
            torch.zeros((), dtype=torch.int64, device=where),
        )

    def average(averaged: list[Tensor], current: list[Tensor], n: Tensor) -> list[Tensor]:
        if avg_fn is not None:
            return [
                avg_fn(a, c, n.to(a.device)).to(a.dtype)
                for a, c in zip(averaged, current, strict=True)
            ]
        # torch groups by device and dtype and averages each group with one call.
        groups: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        for index, leaf in enumerate(averaged):
            groups.setdefault((leaf.device, leaf.dtype), []).append(index)
        out: list[Tensor] = list(averaged)
        for (where, _), indices in groups.items():
            group_avg, group_cur = [averaged[i] for i in indices], [current[i] for i in indices]
            n_here = n.to(where)
            if multi_avg_fn is not None:
                result = multi_avg_fn(group_avg, group_cur, n_here)
            elif where.type in FOREACH_DEVICES:
                result = swa_multi_avg_fn()(group_avg, group_cur, n_here)
            else:
                mean = swa_avg_fn()
                result = [
                    mean(a, c, n_here).to(a.dtype)
                    for a, c in zip(group_avg, group_cur, strict=True)
                ]
            for i, leaf in zip(indices, result, strict=True):
                out[i] = leaf
        return out

    def update(avg: AverageState, params: Params, state: State | None = None) -> AverageState:
        state = dict(state or {})
        averaged_tree = {"params": avg.params, "state": avg.state if use_buffers else {}}
        current_tree = {"params": params, "state": state if use_buffers else {}}
        averaged_entries = tree_flatten_with_paths(averaged_tree)
        current_entries = tree_flatten_with_paths(current_tree)
        if [p for p, _ in averaged_entries] != [p for p, _ in current_entries]:
            raise ValueError(
                "averaged_model update: these leaves are not in both the model and the average: "
                f"{sorted({p for p, _ in current_entries} ^ {p for p, _ in averaged_entries})}"
            )
        for (path, a), (_, c) in zip(averaged_entries, current_entries, strict=True):
            if a.shape != c.shape or a.dtype != c.dtype:
                raise ValueError(
                    f"averaged_model update: leaf {path!r} is {tuple(c.shape)} {c.dtype}, the "
                    f"average's is {tuple(a.shape)} {a.dtype}; init the average from this model"
                )
        averaged = [leaf for _, leaf in averaged_entries]
        current = [
            c.detach().to(a.device) for a, (_, c) in zip(averaged, current_entries, strict=True)
        ]
        # The first update copies (torch tests n_averaged == 0 on the host; a where keeps
        # the step free of syncs and graph breaks and picks the copy bit for bit).
        first = avg.n_averaged == 0
        new = [
            torch.where(first.to(a.device), c, m)
            for a, c, m in zip(
                averaged, current, average(averaged, current, avg.n_averaged), strict=True
            )
        ]
        new_tree = tree_unflatten_like(averaged_tree, new)
        if use_buffers:
            new_state = new_tree["state"]
        else:  # torch keeps the buffers in sync with the current model's
            new_state = tree_map(lambda b: _copy(b, avg.n_averaged.device), state)
        return AverageState(new_tree["params"], new_state, avg.n_averaged + 1)

    return Averager(init, update)


def swa_lr(
    lr: float, swa_lr: float, anneal_epochs: int = 10, anneal_strategy: str = "cos"
) -> Schedule:
    """``SWALR(optimizer, swa_lr, anneal_epochs, anneal_strategy)``: from ``lr`` (the
    optimiser's lr when the scheduler is made) to ``swa_lr`` over ``anneal_epochs`` steps
    along a half cosine or a line, then ``swa_lr``.

    torch recovers the starting lr from the current one at every step; this is the closed
    form, ``swa_lr * alpha + lr * (1 - alpha)`` with ``alpha = f(min(1, t / anneal_epochs))``
    (``anneal_epochs=0`` jumps to ``swa_lr`` at once, as torch's does).

    Args:
        lr: the learning rate at step 0.
        swa_lr: the learning rate annealed to.
        anneal_epochs: the steps (usually epochs) the annealing takes.
        anneal_strategy: ``"cos"`` or ``"linear"``.

    Returns:
        The schedule.

    Raises:
        ValueError: an unknown ``anneal_strategy`` or a negative ``anneal_epochs``.

    Example:
        >>> schedule = swa_lr(1.0, swa_lr=0.5, anneal_epochs=2, anneal_strategy="linear")
        >>> [float(schedule(t)) for t in range(4)]
        [1.0, 0.75, 0.5, 0.5]
    """
    if anneal_strategy not in ("cos", "linear"):
        raise ValueError(f"anneal_strategy must be 'cos' or 'linear', got {anneal_strategy!r}")
    if not isinstance(anneal_epochs, int) or anneal_epochs < 0:
        raise ValueError(f"anneal_epochs must be a non-negative integer, got {anneal_epochs!r}")
    target = swa_lr

    def schedule(step: Tensor | int) -> Tensor:
        t = torch.as_tensor(step).to(torch.float64)
        if anneal_epochs == 0:
            t = torch.clamp(t, min=1.0)
        progress = torch.clamp(t / max(1, anneal_epochs), 0.0, 1.0)
        alpha = progress if anneal_strategy == "linear" else (1 - torch.cos(math.pi * progress)) / 2
        return target * alpha + lr * (1 - alpha)

    return schedule


def _cumulative_batch_norms(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        module = factory()
        for sub in module.modules():
            if isinstance(sub, BATCH_NORMS):
                sub.momentum = None  # BatchNorm then keeps the plain mean over batches
        return module

    return build


def update_bn(
    model: Model,
    params: Params,
    state: State,
    batches: Iterable[Any],
    *,
    rng: int | Tensor | None = None,
    device: torch.device | str | None = None,
) -> State:
    """``torch.optim.swa_utils.update_bn(loader, model, device)``: BatchNorm statistics
    recomputed for ``params`` (an average's) as the plain mean over ``batches``.

    Every BatchNorm's running statistics are reset, then each batch (a tensor, or a
    tuple/list whose first element is the input) runs through the model in training
    mode with BatchNorm's ``momentum=None``. Nothing is mutated: the new state is returned.

    Args:
        model: the :class:`Model`.
        params, state: the params to fit the statistics to and the state to start from.
        batches: an iterable of batches (a ``DataLoader``).
        rng: a key or seed for dropout (batch ``i`` uses ``fold_in(key, i)``); torch's
            ``update_bn`` runs dropout too, from the global generator.
        device: move each input there first.

    Returns:
        The new state (unchanged when the model has no BatchNorm, as torch's returns early).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from functorch_diary import Model
        >>> model = Model(lambda: nn.BatchNorm1d(2))
        >>> params, state = model.init(0)
        >>> state = update_bn(model, params, state, [torch.ones(4, 2), 3 * torch.ones(4, 2)])
        >>> state["running_mean"], int(state["num_batches_tracked"])
        (tensor([2., 2.]), 2)
    """
    prefixes = [
        f"{name}." if name else ""
        for name, sub in model.template.named_modules()
        if isinstance(sub, BATCH_NORMS) and sub.track_running_stats
    ]
    if not any(isinstance(sub, BATCH_NORMS) for sub in model.template.modules()):
        return state
    new_state = dict(state)
    for prefix in prefixes:
        # reset_running_stats: mean 0, variance 1, no batches seen.
        new_state[f"{prefix}running_mean"] = torch.zeros_like(state[f"{prefix}running_mean"])
        new_state[f"{prefix}running_var"] = torch.ones_like(state[f"{prefix}running_var"])
        tracked = f"{prefix}num_batches_tracked"
        new_state[tracked] = torch.zeros_like(state[tracked])
    cumulative = Model(_cumulative_batch_norms(model.factory))
    base = None if rng is None else prng.key(rng)
    for index, batch in enumerate(batches):
        inputs = batch[0] if isinstance(batch, (list, tuple)) else batch
        if device is not None:
            inputs = inputs.to(device)
        key = None if base is None else prng.fold_in(base, index)
        _, new_state = cumulative.apply(params, new_state, inputs, train=True, rng=key)
    return new_state
