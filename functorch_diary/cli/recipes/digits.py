"""Recipes on handwritten digits: LeNet, the MLP and logistic regression of seed 004.

With no ``--data-dir`` they train on scikit-learn's bundled digits (upsampled to
28x28); with ``--data-dir`` they read MNIST's IDX files from it.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...data import Split, load_digits, load_mnist_idx
from ...optim import adam
from ...zoo.models import lenet, logistic_regression, mlp
from .base import Recipe

__all__ = ["RECIPES"]


def _digits_or_mnist(data_dir: Path | None) -> Split:
    return load_digits(size=28) if data_dir is None else load_mnist_idx(data_dir)


def _adam(lr: float, total_steps: int):
    # Cosine decay to zero over the run: the last epochs settle instead of wobbling
    # around the minimum, so the reported test accuracy is stable from seed to seed.
    def cosine(count: torch.Tensor) -> torch.Tensor:
        progress = count.to(torch.float64).clamp(max=total_steps) / max(total_steps, 1)
        return lr * 0.5 * (1.0 + torch.cos(math.pi * progress))

    return adam(cosine)


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="lenet",
            description="seed 004's LeNet-5 (sigmoid, max pooling) on 28x28 digits, Adam",
            build_model=lenet,
            load_data=_digits_or_mnist,
            make_optimizer=_adam,
            epochs=30,
            batch_size=32,
            # 3e-3 with 10% of the images held out for validation: 0.975 test accuracy at
            # seed 0, where 5e-3 (tuned on all of them) gives 0.944.
            lr=3e-3,
        ),
        Recipe(
            name="mlp",
            description="seed 004's MLP 784-256-10 on 28x28 digits, Adam",
            build_model=mlp,
            load_data=_digits_or_mnist,
            make_optimizer=_adam,
            epochs=20,
            batch_size=64,
            lr=1e-3,
        ),
        Recipe(
            name="logreg",
            description="seed 004's logistic regression on 28x28 digits, Adam",
            build_model=logistic_regression,
            load_data=_digits_or_mnist,
            make_optimizer=_adam,
            epochs=30,
            batch_size=64,
            lr=3e-3,
        ),
    )
}
