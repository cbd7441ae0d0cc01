"""The model zoo: networks, layers and losses, detection decoding and metrics, darknet
weights, and style transfer built on them."""

from . import darknet_weights, detection, losses, models, partial_conv, style

__all__ = ["darknet_weights", "detection", "losses", "models", "partial_conv", "style"]
