"""``torch.optim.lr_scheduler`` interop: a schedule's position to and from a scheduler's
``state_dict``.

torch keeps a scheduler's state apart from its optimiser's; here a schedule is a function
of the step count and a plateau's counters live in the
:func:`~functorch_diary.optim.reduce_lr_on_plateau` stage, both in the optimiser state.
:func:`export_scheduler_state` writes the torch scheduler's ``state_dict`` at our step;
the way back is :func:`~functorch_diary.checkpoint.torch_optim.import_optimizer_state`'s
``scheduler=`` (its step count or plateau counters, through :func:`with_plateau_counters`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..optim.schedules import ReduceLROnPlateauState
from ..optim.transforms import ScaleByLearningRateState
from ..tree import tree_map_nodes, tree_nodes
from .format import CheckpointError

__all__ = ["export_scheduler_state", "is_plateau", "with_plateau_counters"]


def is_plateau(scheduler: Mapping[str, Any]) -> bool:
    """Whether ``scheduler`` is a ``ReduceLROnPlateau``'s ``state_dict`` (metric-driven, so its
    ``last_epoch`` counts reports, not steps).

    Example:
        >>> is_plateau({"best": 1.0, "num_bad_epochs": 0}), is_plateau({"last_epoch": 3})
        (True, False)
    """
    return "num_bad_epochs" in scheduler and "best" in scheduler


def _plateau_stages(opt_state: Any) -> list[ReduceLROnPlateauState]:
    found = tree_nodes(opt_state, ReduceLROnPlateauState)
    if len(found) != 1:
        raise CheckpointError(
            f"a ReduceLROnPlateau state_dict needs one reduce_lr_on_plateau stage in the "
            f"optimiser state; it has {len(found)}"
        )
    return found


def _check_plateau_options(stage: ReduceLROnPlateauState, scheduler: Mapping[str, Any]) -> None:
    """Refuse a ``ReduceLROnPlateau`` whose options are not the stage's: its counters would
    mean something else."""
    c = stage.config
    ours = {
        "mode": "min" if bool(c.minimize) else "max",
        "threshold_mode": "rel" if bool(c.relative) else "abs",
        "factor": float(c.factor),
        "patience": int(c.patience),
        "threshold": float(c.threshold),
        "cooldown": int(c.cooldown),
        "eps": float(c.eps),
    }
    theirs = {key: scheduler.get(key) for key in ours}
    min_lrs = set(scheduler.get("min_lrs", []))
    if min_lrs != {float(c.min_lr)}:
        ours["min_lrs"], theirs["min_lrs"] = [float(c.min_lr)], sorted(min_lrs)
    differ = [
        f"{key}={theirs[key]!r} (stage: {ours[key]!r})" for key in ours if ours[key] != theirs[key]
    ]
    if differ:
        raise CheckpointError(
            "the ReduceLROnPlateau state_dict's options differ from the reduce_lr_on_plateau "
            f"stage's: {', '.join(differ)}"
        )


def with_plateau_counters(opt_state: Any, scheduler: Mapping[str, Any]) -> Any:
    """``opt_state`` with its one :func:`~functorch_diary.optim.reduce_lr_on_plateau`
    stage's ``best``, ``num_bad_epochs`` and ``cooldown_counter`` read from a
    ``ReduceLROnPlateau`` ``state_dict`` (nothing modified).

    Raises:
        CheckpointError: the state has no such stage or several, or the scheduler's
            options differ from the stage's.

    Example:
        >>> from functorch_diary import optim
        >>> state = optim.reduce_lr_on_plateau(0.1).init({})
        >>> sched = {"best": 0.5, "num_bad_epochs": 2, "cooldown_counter": 0, "mode": "min",
        ...          "threshold_mode": "rel", "factor": 0.1, "patience": 10,
        ...          "threshold": 1e-4, "cooldown": 0, "eps": 1e-8, "min_lrs": [0.0]}
        >>> int(with_plateau_counters(state, sched).num_bad_epochs)
        2
    """
    (stage,) = _plateau_stages(opt_state)
    _check_plateau_options(stage, scheduler)

    def fill(node: ReduceLROnPlateauState) -> ReduceLROnPlateauState:
        return node._replace(
            best=torch.full_like(node.best, float(scheduler["best"])),
            num_bad_epochs=torch.full_like(node.num_bad_epochs, int(scheduler["num_bad_epochs"])),
            cooldown_counter=torch.full_like(
                node.cooldown_counter, int(scheduler["cooldown_counter"])
            ),
        )

    return tree_map_nodes(fill, opt_state, ReduceLROnPlateauState)


def _steps_of(opt_state: Any) -> int:
    """The steps taken: the count of the first learning-rate stage (as ``current_lr``)."""
    for node in tree_nodes(opt_state, ScaleByLearningRateState):
        return int(node.count)
    raise CheckpointError("the optimiser state holds no learning-rate stage to count steps by")


def export_scheduler_state(
    opt_state: Any, scheduler_state_dict: Mapping[str, Any], param_groups: Sequence[Mapping]
) -> dict[str, Any]:
    """Our schedule's position as a ``torch.optim.lr_scheduler`` ``state_dict``, to go with
    :func:`export_optimizer_state` (torch keeps a scheduler's state apart from its
    optimiser's; ours is in the optimiser state).

    Args:
        opt_state: the optimiser state.
        scheduler_state_dict: ``torch_scheduler.state_dict()`` of a scheduler built with
            the same options as our schedule (its ``base_lrs`` and options are kept).
        param_groups: the exported optimiser state's ``param_groups`` (the learning rates
            torch's scheduler last set).

    Returns:
        The scheduler's ``state_dict`` at our step: ``last_epoch`` is the step count
        (``_step_count`` one more, which is where ``swa_utils.SWALR`` reads it) and
        ``_last_lr`` the groups' learning rates; ``CosineAnnealingWarmRestarts`` also gets
        its ``T_cur`` and ``T_i``. A ``ReduceLROnPlateau`` gets the
        :func:`~functorch_diary.optim.reduce_lr_on_plateau` stage's ``best``,
        ``num_bad_epochs`` and ``cooldown_counter`` (its ``last_epoch`` counts metric
        reports, which change nothing, and is left as it was).

    Raises:
        CheckpointError: a ``SequentialLR`` or ``ChainedScheduler`` (export each part),
            a plateau scheduler whose options differ from the stage's, or a state with no
            learning-rate stage.

    Example:
        >>> import torch
        >>> from functorch_diary import optim
        >>> opt = optim.sgd(optim.cosine_annealing_warm_restarts(0.1, T_0=2), momentum=0.9)
        >>> params = {"w": torch.ones(2)}
        >>> state = opt.init(params)
        >>> for _ in range(3):
        ...     params, state = optim.apply_gradients(opt, {"w": torch.ones(2)}, state, params)
        >>> torch_opt = torch.optim.SGD([torch.ones(2, requires_grad=True)], lr=0.1, momentum=0.9)
        >>> sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(torch_opt, T_0=2)
        >>> from functorch_diary.checkpoint import export_optimizer_state
        >>> sd = export_optimizer_state(state, params, torch_opt.state_dict()["param_groups"])
        >>> out = export_scheduler_state(state, sched.state_dict(), sd["param_groups"])
        >>> out["last_epoch"], out["T_cur"], out["_last_lr"]
        (3, 1, [0.05])
    """
    out = dict(scheduler_state_dict)
    if "_schedulers" in out:
        raise CheckpointError(
            "cannot export a SequentialLR or ChainedScheduler state: its parts keep their "
            "own state_dicts; export each part's"
        )
    if is_plateau(out):
        (stage,) = _plateau_stages(opt_state)
        _check_plateau_options(stage, out)
        out["best"] = float(stage.best)
        out["num_bad_epochs"] = int(stage.num_bad_epochs)
        out["cooldown_counter"] = int(stage.cooldown_counter)
    else:
        steps = _steps_of(opt_state)
        out["last_epoch"] = steps
        if "_step_count" in out:
            # The construction's step counts too; SWALR reads its position from it.
            out["_step_count"] = steps + 1
        if {"T_cur", "T_i", "T_0", "T_mult"} <= set(out):
            # CosineAnnealingWarmRestarts' step(): T_cur += 1, a restart at T_i.
            t_cur, t_i = steps, out["T_0"]
            while t_cur >= t_i:
                t_cur, t_i = t_cur - t_i, t_i * out["T_mult"]
            out["T_cur"], out["T_i"] = t_cur, t_i
    out["_last_lr"] = [group["lr"] for group in param_groups]
    return out
