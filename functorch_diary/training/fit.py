"""A complete training run: epochs of pure steps, validation, callbacks, a history.

This is the usual ``for epoch ...: for x, y in loader: ...`` loop, once, for every
recipe: the state threads through ``step`` explicitly, and evaluation uses the eval step
(BatchNorm running statistics, no dropout) without any ``model.eval()`` to forget.

What Keras's ``model.fit`` and Lightning's ``Trainer.fit`` do with objects that hold
state, ``fit`` does with values: a validation split held out of the training images
(never the test split), a list of epoch records (``fit`` returns it, like Keras's
``History``), and *callbacks* that receive the current ``TrainState``, the epoch's
metrics and the history so far and return a :class:`Decision` (stop or go on): they
never change the state. Checkpointing, early stopping and logging are such callbacks
(:mod:`.callbacks`, :mod:`.loggers`). ``train_state=`` continues a run: from a
checkpoint at an epoch boundary, the rest of the run is bit for bit the run that was
never interrupted (batch order, augmentation and dropout keys are functions of the seed,
the epoch and ``train_state.step``).

Example:
    >>> import torch
    >>> from functorch_diary import models, optim
    >>> from functorch_diary.training import fit
    >>> from functorch_diary.data import Split
    >>> x, y = torch.randn(80, 1, 28, 28), torch.randint(0, 10, (80,))
    >>> result = fit.fit(models.lenet(), optim.adam(1e-3), Split(x, y, x, y),
    ...                  epochs=2, batch_size=32, progress=False)
    >>> [int(r["step"]) for r in result.history], sorted(result.test)
    ([2, 4], ['accuracy', 'loss'])
    >>> more = fit.fit(models.lenet(), optim.adam(1e-3), Split(x, y, x, y), epochs=3,
    ...                batch_size=32, progress=False, train_state=result.train_state,
    ...                history=result.history)
    >>> int(more.train_state.step), [int(r["epoch"]) for r in more.history]
    (6, [1, 2, 3])
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import prng
from ..data import Split, batches
from ..model.core import Model
from ..optim import GradientTransformation, current_lr
from .evaluation import Evaluate, classification_metrics
from .step import LossFn, TrainState, init_train_state, make_eval_step, make_train_step

__all__ = ["Augment", "Callback", "Decision", "FitResult", "Record", "fit", "hold_out"]

#: One epoch's (or one logging step's) numbers: ``epoch``, ``step``, ``train_loss``,
#: ``lr``, ``seconds``, ``samples_per_second`` and ``val_<metric>`` for each validation
#: metric.
Record = dict[str, float]

#: ``augment(inputs, targets, key) -> (inputs, targets)``: a training batch's
#: augmentation, pure and keyed, so targets that live in the image (masks, boxes) move
#: with its pixels; a classifier's returns its labels as they are.
Augment = Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]


class Decision(NamedTuple):
    """What a callback asks of ``fit``: ``stop=True`` ends the run after this epoch."""

    stop: bool = False
    reason: str = ""


class Callback(Protocol):
    """Called after every epoch with copies: ``callback(ts, metrics, history)``.

    ``history`` holds every epoch record so far, ``metrics`` (its last entry) included.
    Return a :class:`Decision` or ``None`` (go on). Optional methods: ``on_step(ts,
    metrics)``, every ``log_every`` steps, and ``on_end(ts, history)``, once, after the
    last epoch (also after an early stop).
    """

    def __call__(
        self, ts: TrainState, metrics: Mapping[str, float], history: Sequence[Record]
    ) -> Decision | None: ...


class FitResult(NamedTuple):
    """The final state, one record per epoch (those of ``history=`` first), the test
    metrics, why it stopped early (``None`` when it ran every epoch)."""

    train_state: TrainState
    history: list[Record]
    test: dict[str, float]
    stopped: str | None = None


def hold_out(x: Any, y: Any, fraction: float, seed: int = 0) -> tuple[Any, Any, Any, Any]:
    """``(x_train, y_train, x_val, y_val)``: a seeded random ``fraction`` of the rows held out.

    Example:
        >>> x, y = torch.arange(10.0), torch.arange(10)
        >>> [len(t) for t in hold_out(x, y, 0.2)]
        [8, 8, 2, 2]
    """
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"validation fraction must be in [0, 1), got {fraction}")
    n_val = round(len(x) * fraction)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    order = order.to(x.device)
    train, val = order[n_val:].sort().values, order[:n_val].sort().values
    return x[train], y[train], x[val], y[val]


def _lr(ts: TrainState) -> float:
    try:
        return float(current_lr(ts.opt_state))
    except ValueError:  # an optimiser with no learning rate in its state
        return math.nan


def _start_epoch(ts: TrainState, steps_per_epoch: int) -> int:
    done = int(ts.step)
    if done % steps_per_epoch:
        raise ValueError(
            f"train_state is at step {done}, not at the end of an epoch of "
            f"{steps_per_epoch} steps: resume from an epoch checkpoint with the same "
            "batch size and data"
        )
    return done // steps_per_epoch


def fit(
    model: Model,
    optimizer: GradientTransformation,
    split: Split,
    *,
    loss_fn: LossFn = F.cross_entropy,
    evaluate: Evaluate = classification_metrics,
    validation: float | tuple[Any, Any] = 0.1,
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    compile: bool | None = None,
    augment: Augment | None = None,
    progress: bool = True,
    train_state: TrainState | None = None,
    history: Sequence[Record] = (),
    callbacks: Sequence[Callback] = (),
    log_every: int = 0,
) -> FitResult:
    """Train ``model`` for ``epochs``, validating after each, and test once at the end.

    Args:
        model, optimizer: what to train and how.
        split: train and test tensors (moved to ``device`` here).
        loss_fn: ``loss_fn(outputs, targets)``; cross entropy by default.
        evaluate: the metrics of a split (:mod:`.evaluation`), for validation and test.
        validation: the share of training rows held out for validation (a fixed seeded
            draw, the same in every run), or explicit ``(x_val, y_val)``; ``0`` for none.
        epochs: the epoch to stop after, counted from the start of the run (a resumed
            run with ``epochs=10`` from epoch 4 runs epochs 5..10).
        batch_size, seed: the run; ``seed`` fixes init, batch order and dropout.
        device: where to train.
        compile: ``torch.compile`` policy of :func:`~functorch_diary.make_train_step`.
        augment: optional :data:`Augment`, applied to each training batch (outside the
            step, so an eager augmentation feeds a compiled step) with the key
            ``fold_in(key(seed + 1), step)``: a resumed run augments as the whole one.
        progress: show a tqdm progress bar.
        train_state: continue from this state (at an epoch boundary) instead of
            ``init_train_state(model, optimizer, seed)``; it is not modified.
        history: the records of the epochs before ``train_state`` (from its
            checkpoint), so callbacks and the returned history see the whole run.
        callbacks: see :class:`Callback`.
        log_every: call the callbacks' ``on_step`` every this many steps (0: never).

    Returns:
        A :class:`FitResult`.

    Raises:
        ValueError: ``batch_size`` exceeds the training rows (no step would run), or
            ``train_state`` is not at an epoch boundary.
    """
    x_train, y_train, x_test, y_test = (t.to(device) for t in split)
    if isinstance(validation, tuple):
        x_val, y_val = (t.to(device) for t in validation)
    else:
        x_train, y_train, x_val, y_val = hold_out(x_train, y_train, validation)
    steps_per_epoch = len(x_train) // batch_size
    if steps_per_epoch == 0:
        raise ValueError(
            f"batch_size {batch_size} exceeds the {len(x_train)} training rows: no step would run"
        )
    ts = (
        train_state
        if train_state is not None
        else init_train_state(model, optimizer, seed, device=device)
    )
    first = _start_epoch(ts, steps_per_epoch)
    step = make_train_step(model, loss_fn, optimizer, compile=compile)
    eval_step = make_eval_step(model, loss_fn, compile=compile)
    history = [dict(record) for record in history]
    stopped: str | None = None
    bar = tqdm(total=max(epochs - first, 0) * steps_per_epoch, disable=not progress, unit="step")
    aug_key = prng.key(seed + 1, device=device)
    for epoch in range(first, epochs):
        start, losses = time.perf_counter(), []
        for xb, yb in batches(x_train, y_train, batch_size, seed=seed, epoch=epoch):
            if augment is not None:
                xb, yb = augment(xb, yb, prng.fold_in(aug_key, ts.step))
            ts, metrics = step(ts, (xb, yb))
            losses.append(metrics["loss"])
            bar.update(1)
            if log_every and len(losses) % log_every == 0:
                seconds = time.perf_counter() - start
                record = {"epoch": epoch + len(losses) / steps_per_epoch,
                          "step": int(ts.step),
                          "train_loss": float(torch.stack(losses[-log_every:]).mean()),
                          "lr": _lr(ts),
                          "samples_per_second": len(losses) * batch_size / seconds}  # fmt: skip
                for callback in callbacks:
                    if hasattr(callback, "on_step"):
                        callback.on_step(ts, dict(record))
        seconds = time.perf_counter() - start
        record = {
            "epoch": epoch + 1,
            "step": int(ts.step),
            "train_loss": float(torch.stack(losses).mean()),
            "lr": _lr(ts),
            "seconds": seconds,
            "samples_per_second": steps_per_epoch * batch_size / seconds,
        }
        if len(y_val):
            record |= {f"val_{k}": v for k, v in evaluate(eval_step, ts, x_val, y_val).items()}
        history.append(record)
        bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k in _SHOWN})
        decisions = [callback(ts, dict(record), tuple(history)) for callback in callbacks]
        reasons = [d.reason or "a callback asked to stop" for d in decisions if d and d.stop]
        if reasons:
            stopped = "; ".join(reasons)
            break
    bar.close()
    for callback in callbacks:
        if hasattr(callback, "on_end"):
            callback.on_end(ts, tuple(history))
    test = evaluate(eval_step, ts, x_test, y_test) if len(y_test) else {}
    return FitResult(ts, history, test, stopped)


_SHOWN = ("train_loss", "val_loss", "val_accuracy")
