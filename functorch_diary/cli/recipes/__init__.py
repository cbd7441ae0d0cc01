"""The training recipes the ``train`` command knows, by name."""

from .base import Recipe
from .cifar import RECIPES as _CIFAR
from .digits import RECIPES as _DIGITS
from .vision import RECIPES as _VISION

RECIPES: dict[str, Recipe] = {**_DIGITS, **_CIFAR, **_VISION}

__all__ = ["RECIPES", "Recipe"]
