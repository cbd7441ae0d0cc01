"""``guard_train_step``: a step whose loss or gradients hold NaN/inf changes nothing.

The optimiser half is :func:`functorch_diary.optim.apply_if_finite`; this wrapper adds the
loss and the model state (BatchNorm), so a bad step leaves the whole ``TrainState`` as it
was except ``step``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..optim.guard import FiniteGuardState, OnNonFinite, check_on_nonfinite
from ..tree import tree_where
from .step import TrainState

__all__ = ["guard_train_step"]


def guard_train_step(
    step: Callable[[TrainState, Any], tuple[TrainState, dict[str, Tensor]]],
    on_nonfinite: OnNonFinite = "skip",
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, Tensor]]]:
    """Guard a whole training step: a NaN/inf loss or gradient leaves params, model state
    and optimiser state exactly as they were.

    Args:
        step: a step from :func:`~functorch_diary.make_train_step` (or the data-parallel
            one), built with an :func:`apply_if_finite` optimiser, which handles the
            gradients; this wrapper adds the loss and the model state (BatchNorm).
        on_nonfinite: ``"skip"`` or ``"raise"`` (:class:`FloatingPointError`, eager only).

    Returns:
        ``guarded(ts, batch) -> (ts, metrics)`` with ``metrics["skipped"]`` (0-dim bool).
        ``ts.step`` advances on every call; ``ts.opt_state.skipped`` counts the skips.
        Compile options of ``step`` still apply: the selection here is a few
        ``torch.where`` calls outside its graph.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from functorch_diary import Model, init_train_state, make_train_step, optim
        >>> model = Model(lambda: nn.Linear(2, 1))
        >>> opt = optim.apply_if_finite(optim.adam(0.1))
        >>> ts = init_train_state(model, opt, seed=0)
        >>> step = guard_train_step(make_train_step(model, nn.functional.mse_loss, opt))
        >>> new, metrics = step(ts, (torch.ones(4, 2), torch.full((4, 1), float("inf"))))
        >>> bool(metrics["skipped"]), int(new.opt_state.skipped), int(new.step)
        (True, 1, 1)
        >>> torch.equal(new.params["weight"], ts.params["weight"])
        True
    """
    check_on_nonfinite(on_nonfinite)

    def guarded(ts: TrainState, batch: Any) -> tuple[TrainState, dict[str, Tensor]]:
        old = ts.opt_state
        if not isinstance(old, FiniteGuardState):
            raise TypeError(
                "guard_train_step needs a step and TrainState built with an apply_if_finite "
                f"optimiser; the opt_state is a {type(old).__name__}"
            )
        new, metrics = step(ts, batch)
        grads_ok = new.opt_state.skipped == old.skipped
        ok = grads_ok & torch.isfinite(metrics["loss"]).all()
        if on_nonfinite == "raise" and not bool(ok):
            raise FloatingPointError(
                f"the loss is {float(metrics['loss'])}; lower the learning rate, clip gradients "
                "or check the batch. Use on_nonfinite='skip' to skip such steps"
            )
        bad = (~ok).to(torch.int64)
        opt_state = FiniteGuardState(
            tree_where(ok, new.opt_state.inner, old.inner),
            old.skipped + bad,
            (old.consecutive + 1) * bad,
        )
        # _select restores the old tensors bit for bit (params + 0 would turn -0.0 into 0.0).
        params = tree_where(ok, new.params, ts.params)
        state = tree_where(ok, new.state, ts.state)
        return new._replace(params=params, state=state, opt_state=opt_state), {
            **metrics,
            "skipped": ~ok,
        }

    return guarded
