"""A complete training run: epochs of pure steps over in-memory data, with evaluation.

This is the diaries' ``for epoch ...: for x, y in loader: ...`` loop, once, for every
recipe: the state threads through ``step`` explicitly, and evaluation uses the eval step
(BatchNorm running statistics, no dropout) without any ``model.eval()`` to forget.

Example:
    >>> import torch
    >>> from functorch_diary import models, optim
    >>> from functorch_diary.training import fit
    >>> from functorch_diary.data import Split
    >>> x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))
    >>> result = fit.fit(models.lenet(), optim.adam(1e-3), Split(x, y, x, y),
    ...                  epochs=1, batch_size=32, progress=False)
    >>> len(result.history), int(result.train_state.step)
    (1, 2)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor
from torch.nn import functional as F
from tqdm.auto import tqdm

from .. import prng
from ..data import Split, batches
from ..model.core import Model
from ..optim import GradientTransformation
from .step import LossFn, TrainState, init_train_state, make_eval_step, make_train_step

__all__ = ["EpochMetrics", "FitResult", "accuracy", "fit"]


class EpochMetrics(NamedTuple):
    epoch: int
    train_loss: float
    test_accuracy: float
    seconds: float


class FitResult(NamedTuple):
    train_state: TrainState
    history: list[EpochMetrics]


def accuracy(
    eval_step: Callable, ts: TrainState, x: Tensor, y: Tensor, batch_size: int = 512
) -> float:
    """Share of ``x`` whose arg-max logit is the label ``y``, evaluated in batches."""
    correct = 0
    for xb, yb in batches(x, y, batch_size, shuffle=False, drop_last=False):
        logits, _ = eval_step(ts, (xb, yb))
        correct += int((logits.argmax(dim=1) == yb).sum())
    return correct / max(len(y), 1)


def fit(
    model: Model,
    optimizer: GradientTransformation,
    split: Split,
    *,
    loss_fn: LossFn = F.cross_entropy,
    epochs: int = 1,
    batch_size: int = 64,
    seed: int = 0,
    device: torch.device | str = "cpu",
    compile: bool | None = None,
    augment: Callable[[Tensor, Tensor], Tensor] | None = None,
    progress: bool = True,
) -> FitResult:
    """Train ``model`` on ``split`` for ``epochs`` and test after each epoch.

    Args:
        model, optimizer: what to train and how.
        split: train and test tensors (moved to ``device`` here).
        loss_fn: ``loss_fn(logits, labels)``; cross entropy by default.
        epochs, batch_size, seed: the run; ``seed`` fixes init, batch order and dropout.
        device: where to train.
        compile: ``torch.compile`` policy of :func:`~functorch_diary.make_train_step`.
        augment: optional ``(images, key) -> images`` for training batches.
        progress: show a tqdm progress bar.

    Returns:
        The final ``TrainState`` and one :class:`EpochMetrics` per epoch.
    """
    x_train, y_train, x_test, y_test = (t.to(device) for t in split)
    ts = init_train_state(model, optimizer, seed, device=device)
    step = make_train_step(model, loss_fn, optimizer, compile=compile)
    eval_step = make_eval_step(model, compile=compile)
    steps_per_epoch = len(x_train) // batch_size
    history: list[EpochMetrics] = []
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step")
    aug_key = prng.key(seed + 1, device=device)
    for epoch in range(epochs):
        start, losses = time.perf_counter(), []
        for xb, yb in batches(x_train, y_train, batch_size, seed=seed, epoch=epoch):
            if augment is not None:
                xb = augment(xb, prng.fold_in(aug_key, ts.step))
            ts, metrics = step(ts, (xb, yb))
            losses.append(metrics["loss"])
            bar.update(1)
        train_loss = float(torch.stack(losses).mean()) if losses else float("nan")
        test_accuracy = accuracy(eval_step, ts, x_test, y_test)
        history.append(
            EpochMetrics(epoch + 1, train_loss, test_accuracy, time.perf_counter() - start)
        )
        bar.set_postfix(loss=f"{train_loss:.4f}", test_acc=f"{test_accuracy:.4f}")
    bar.close()
    return FitResult(ts, history)
