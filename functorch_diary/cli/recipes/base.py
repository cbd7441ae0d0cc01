"""What a training recipe is: a model, its data, its optimiser and its defaults.

The ``train`` command runs any recipe with the same loop (progress bar, evaluation on the
held-out split each epoch), so adding a network to the CLI is adding a ``Recipe``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch import Tensor

from ...data import Split
from ...model.core import Model
from ...optim import GradientTransformation

__all__ = ["Recipe"]


@dataclass(frozen=True)
class Recipe:
    """A named training setup for ``python -m functorch_diary train NAME``.

    Attributes:
        name: the command-line name.
        description: one line for ``--help``.
        build_model: ``() -> Model``.
        load_data: ``(data_dir or None) -> Split``; ``None`` means the recipe's default
            data, and a recipe that has none raises ``FileNotFoundError`` naming the files.
        make_optimizer: ``(lr, total_steps) -> GradientTransformation`` (``total_steps``
            lets a recipe scale its schedule to the run's length).
        epochs, batch_size, lr: defaults the command line can override.
        augment: optional ``(images, key) -> images`` applied to each training batch.
    """

    name: str
    description: str
    build_model: Callable[[], Model]
    load_data: Callable[[Path | None], Split]
    make_optimizer: Callable[[float, int], GradientTransformation]
    epochs: int
    batch_size: int
    lr: float
    augment: Callable[[Tensor, Tensor], Tensor] | None = None
