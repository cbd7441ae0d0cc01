"""What a training recipe is: a model, its data, its loss, its metrics, its optimiser
and its defaults.

The ``train`` command runs any recipe with the same loop
(:func:`~functorch_diary.training.fit.fit`: progress bar, validation each epoch,
checkpoints, logs), so adding a network to the CLI is adding a ``Recipe``. Classifiers
keep the defaults (cross entropy, loss and accuracy); a segmentation or detection recipe
gives its own ``loss_fn``, ``evaluate`` and ``monitor``, an ``augment`` that moves its
targets (masks, boxes) with the pixels, and a ``draw`` for its prediction picture.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from torch import Tensor
from torch.nn import functional as F

from ...data import Split
from ...model.core import Model
from ...optim import GradientTransformation
from ...training.evaluation import Evaluate, classification_metrics
from ...training.fit import Augment
from ...training.step import LossFn, TrainState

__all__ = ["Recipe"]


@dataclass(frozen=True)
class Recipe:
    """A named training setup for ``functorch-diary train NAME``.

    Attributes:
        name: the command-line name.
        description: one line for ``--help``: what the model is and how it is trained.
        build_model: ``() -> Model``.
        load_data: ``(data_dir or None) -> Split``; ``None`` means the recipe's default
            data, and a recipe that has none raises ``FileNotFoundError`` naming the files.
        make_optimizer: ``(lr, total_steps) -> GradientTransformation`` (``total_steps``
            lets a recipe scale its schedule to the run's length).
        epochs, batch_size, lr: defaults the command line can override.
        augment: optional ``(images, targets, key) -> (images, targets)``, applied to
            each training batch with that step's key (a function of ``--seed`` and the
            step, so a resumed run augments as the uninterrupted one); a classifier's
            returns its labels unchanged, a segmentation or detection one moves the
            masks or boxes with the pixels.
        loss_fn: ``loss_fn(outputs, targets) -> scalar`` for the train and eval steps.
        evaluate: ``(eval_step, train_state, inputs, targets) -> {"metric": float}``, run
            on the validation split each epoch and on the test split at the end
            (see :mod:`functorch_diary.training.evaluation`).
        monitor, mode: the ``evaluate`` key that picks the best checkpoint, and whether
            higher (``"max"``) or lower (``"min"``) is better.
        validation: share of the training images held out for validation (never the
            test split); ``0`` validates on nothing.
        draw: optional ``(model, train_state, images, targets) -> picture``, a uint8
            ``(3, H, W)`` CPU tensor of the model's predictions on ``images`` (on the
            state's device); ``train --out`` writes it for the first test images as
            ``predictions.png``.
    """

    name: str
    description: str
    build_model: Callable[[], Model]
    load_data: Callable[[Path | None], Split]
    make_optimizer: Callable[[float, int], GradientTransformation]
    epochs: int
    batch_size: int
    lr: float
    augment: Augment | None = None
    loss_fn: LossFn = F.cross_entropy
    evaluate: Evaluate = classification_metrics
    monitor: str = "accuracy"
    mode: Literal["min", "max"] = "max"
    validation: float = 0.1
    draw: Callable[[Model, TrainState, Tensor, Tensor], Tensor] | None = None
