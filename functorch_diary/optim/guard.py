"""Non-finite guard: a step whose loss or gradients hold NaN/inf changes nothing.

One bad batch (a ``log(0)``, an exploding GAN critic) writes NaN into every weight and
into the optimiser's moments, and the run is lost. Two pieces stop that:

- :func:`apply_if_finite` wraps any optimiser (like ``optax.apply_if_finite``). When a
  gradient leaf holds NaN/inf, the update is ``-0.0``
  (:data:`~functorch_diary.optim.base.NO_UPDATE`: params come back bit for bit, as from
  ``apply_gradients``), the wrapped optimiser's state is
  kept as it was, and the counters in :class:`FiniteGuardState` go up. It works with the
  plain :func:`~functorch_diary.make_train_step`; there the model state (BatchNorm
  statistics) of a bad step is still kept.
- :func:`guard_train_step` wraps a whole training step built with such an optimiser: it
  also checks the loss, and keeps params, model state *and* optimiser state of a bad
  step unchanged. ``step`` still advances, so the next step draws a new batch and new
  dropout masks instead of repeating the failure.

In ``"skip"`` mode the choice is made with ``torch.where`` on tensors, never a Python
``if`` on a tensor value, so a step with :func:`apply_if_finite` inside compiles to one
graph with no host sync. In ``"raise"`` mode a bad step raises
:class:`FloatingPointError` naming the first bad leaf paths; that reads the flag on the
host, so use it eagerly (``compile=False``).

Example:
    >>> import torch
    >>> from functorch_diary import optim
    >>> from functorch_diary.optim import guard
    >>> opt = guard.apply_if_finite(optim.sgd(lr=0.1))
    >>> params = {"w": torch.ones(2)}
    >>> state = opt.init(params)
    >>> updates, state = opt.update({"w": torch.tensor([1.0, float("nan")])}, state, params)
    >>> updates["w"], int(state.skipped), int(state.consecutive)
    (tensor([-0., -0.]), 1, 1)
    >>> updates, state = opt.update({"w": torch.ones(2)}, state, params)
    >>> updates["w"], int(state.skipped), int(state.consecutive)
    (tensor([-0.1000, -0.1000]), 1, 0)
"""

from __future__ import annotations

from typing import Any, Literal, NamedTuple

import torch
from torch import Tensor

from ..tree import PyTree, tree_flatten_with_paths, tree_leaves, tree_where
from . import fused
from .base import GradientTransformation, apply_gradients, updates_where
from .shards import all_ranks

__all__ = [
    "FiniteGuardState",
    "OnNonFinite",
    "all_finite",
    "apply_if_finite",
    "check_on_nonfinite",
    "nonfinite_paths",
]

OnNonFinite = Literal["skip", "raise"]


class FiniteGuardState(NamedTuple):
    """State of :func:`apply_if_finite`.

    Attributes:
        inner: the wrapped optimiser's state (unchanged by skipped steps).
        skipped: how many steps were skipped in total (0-dim int64).
        consecutive: how many steps were skipped since the last good one (0-dim int64);
            a value that keeps growing means the run has diverged, not hit one bad batch.
    """

    inner: Any
    skipped: Tensor
    consecutive: Tensor


def all_finite(tree: PyTree) -> Tensor:
    """A 0-dim bool tensor: every floating/complex leaf of ``tree`` is free of NaN and inf.

    Integer leaves are finite by nature and skipped; an empty tree is finite.
    """
    flags = [
        torch.isfinite(leaf).all()
        for leaf in tree_leaves(tree)
        if isinstance(leaf, Tensor) and (leaf.is_floating_point() or leaf.is_complex())
    ]
    return torch.stack(flags).all() if flags else torch.tensor(True)


def nonfinite_paths(tree: PyTree) -> list[str]:
    """The paths of the leaves holding NaN or inf (host sync: for messages, not for graphs)."""
    return [
        path
        for path, leaf in tree_flatten_with_paths(tree)
        if isinstance(leaf, Tensor)
        and (leaf.is_floating_point() or leaf.is_complex())
        and not bool(torch.isfinite(leaf).all())
    ]


def check_on_nonfinite(on_nonfinite: str) -> None:
    if on_nonfinite not in ("skip", "raise"):
        raise ValueError(f"on_nonfinite must be 'skip' or 'raise', got {on_nonfinite!r}")


def _raise_nonfinite(grads: PyTree, what: str) -> None:
    bad = nonfinite_paths(grads)
    shown = ", ".join(bad[:5]) + (", ..." if len(bad) > 5 else "")
    raise FloatingPointError(
        f"{what} holds NaN or inf (non-finite gradient leaves: {shown}); lower the learning "
        "rate, clip gradients, or check the batch. Use on_nonfinite='skip' to skip such steps"
    )


def apply_if_finite(
    inner: GradientTransformation, on_nonfinite: OnNonFinite = "skip"
) -> GradientTransformation:
    """Wrap ``inner`` so that gradients with NaN/inf produce no update.

    Args:
        inner: the optimiser to guard, e.g. ``optim.adam(1e-3)``.
        on_nonfinite: ``"skip"`` (``-0.0`` update, ``inner``'s state kept, counters + 1) or
            ``"raise"`` (:class:`FloatingPointError` naming the bad leaves; eager only).

    Returns:
        A :class:`~functorch_diary.optim.GradientTransformation` whose state is a
        :class:`FiniteGuardState`.
    """
    check_on_nonfinite(on_nonfinite)

    def init(params: PyTree) -> FiniteGuardState:
        leaves = tree_leaves(params)
        device = leaves[0].device if leaves else None
        zero = torch.zeros((), dtype=torch.int64, device=device)
        return FiniteGuardState(inner.init(params), zero, zero.clone())

    def check(grads: PyTree, state: FiniteGuardState) -> Tensor:
        """Whether ``grads`` are all finite (0-dim bool), raising in ``"raise"`` mode."""
        if not isinstance(state, FiniteGuardState):
            raise TypeError(
                f"apply_if_finite got a {type(state).__name__} state; initialise the TrainState "
                "with the wrapped optimiser (init_train_state(model, apply_if_finite(opt)))"
            )
        # On shards every rank must take the same branch: a NaN in one rank's piece skips
        # the step everywhere.
        ok = all_ranks(all_finite(grads))
        if on_nonfinite == "raise" and not bool(ok):
            _raise_nonfinite(grads, "the gradient")
        return ok

    def guarded(ok: Tensor, state: FiniteGuardState, inner_state: Any) -> FiniteGuardState:
        bad = (~ok).to(torch.int64)
        return FiniteGuardState(
            tree_where(ok, inner_state, state.inner),
            state.skipped + bad,
            (state.consecutive + 1) * bad,
        )

    # inner runs on every step (no Python branch): its outputs are discarded when not ok.
    def update(grads: PyTree, state: FiniteGuardState, params: PyTree | None = None):
        ok = check(grads, state)
        updates, inner_state = inner.update(grads, state.inner, params)
        return updates_where(ok, updates), guarded(ok, state, inner_state)

    # apply_gradients takes inner's fused step, so a guarded step that applies is the
    # unguarded one to the bit.
    def update_and_apply(grads: PyTree, state: FiniteGuardState, params: PyTree):
        ok = check(grads, state)
        # Copies even for a donated TrainState: the old params are kept on a skipped step.
        with fused.in_place(False):
            new_params, inner_state = apply_gradients(inner, grads, state.inner, params)
        return tree_where(ok, new_params, params), guarded(ok, state, inner_state)

    return GradientTransformation(init, update, update_and_apply)
