"""Layers the diaries use that torch does not ship, each a pure function and a module."""

from .partial_conv import PartialConv, PartialConv2d, partial_conv, partial_conv2d

__all__ = ["PartialConv", "PartialConv2d", "partial_conv", "partial_conv2d"]
