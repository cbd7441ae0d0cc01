"""The training recipes the ``train`` command knows, by name."""

from .base import Recipe
from .cifar import RECIPES as _CIFAR
from .digits import RECIPES as _DIGITS

RECIPES: dict[str, Recipe] = {**_DIGITS, **_CIFAR}

__all__ = ["RECIPES", "Recipe"]
