"""The model zoo: networks, layers and losses, and style transfer built on them."""

from . import losses, models, partial_conv, style

__all__ = ["losses", "models", "partial_conv", "style"]
