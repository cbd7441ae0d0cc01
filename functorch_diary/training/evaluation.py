"""Evaluation metrics over a whole split, for ``fit``, the recipes and ``evaluate``.

An *evaluate function* maps ``(eval_step, train_state, inputs, targets)`` to a dict of
floats. ``eval_step`` is :func:`~functorch_diary.training.step.make_eval_step`'s, built
once by the caller (so a compiled one is traced once, not per evaluation). The default,
:func:`classification_metrics`, gives the mean loss and the accuracy; a segmentation or
detection recipe passes its own (mean IoU, mAP...) with the same signature.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from torch.nn import functional as F
    >>> from functorch_diary import Model, optim, init_train_state, make_eval_step
    >>> model = Model(lambda: nn.Linear(2, 3))
    >>> ts = init_train_state(model, optim.sgd(0.1))
    >>> x, y = torch.randn(10, 2), torch.randint(0, 3, (10,))
    >>> sorted(classification_metrics(make_eval_step(model, F.cross_entropy), ts, x, y))
    ['accuracy', 'loss']
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..data import batches
from .step import TrainState

__all__ = ["EvalStep", "Evaluate", "classification_metrics"]

#: ``eval_step(train_state, (inputs, targets)) -> (outputs, {"loss": ...})``.
EvalStep = Callable[[TrainState, Any], tuple[Any, dict[str, Any]]]
#: ``evaluate(eval_step, train_state, inputs, targets) -> {"name": value}``.
Evaluate = Callable[[EvalStep, TrainState, Any, Any], dict[str, float]]


def classification_metrics(
    eval_step: EvalStep, ts: TrainState, inputs: Any, targets: Any, batch_size: int = 512
) -> dict[str, float]:
    """``{"loss": mean loss, "accuracy": share of arg-max logits equal to the label}``.

    The loss is the eval step's, averaged over examples (each batch weighted by its size),
    so it is the full-split mean whatever the batch size; ``"loss"`` is absent when the
    eval step was built without a loss.
    """
    correct, total, loss_sum, has_loss = 0, 0, 0.0, False
    for xb, yb in batches(inputs, targets, batch_size, shuffle=False, drop_last=False):
        logits, metrics = eval_step(ts, (xb, yb))
        correct += int((logits.argmax(dim=1) == yb).sum())
        if "loss" in metrics:
            loss_sum, has_loss = loss_sum + float(metrics["loss"]) * len(yb), True
        total += len(yb)
    result = {"accuracy": correct / max(total, 1)}
    if has_loss:
        result["loss"] = loss_sum / total
    return dict(sorted(result.items()))
