"""UNet with the usual ``DoubleConv`` block, functional.

A classic UNet bug loses time to ``Given groups=1, weight of size 64 3 3 3, expected input[4, 64,
158, 158] to have 3 channels``: the second convolution of ``DoubleConv`` was built with
``in_channels`` instead of ``out_channels``. Here the block takes its widths once and
the functional model checks every leaf's shape before running, so a wrongly built
checkpoint fails with the parameter's name (``down1.double_conv.3.weight``) instead.

The convolutions are padded (``padding=1``) so the output map has the input's size and
skip connections concatenate without cropping; input sides must be divisible by
``2 ** depth``.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import unet
    >>> model = unet(in_channels=3, num_classes=4, base=8, depth=2)
    >>> params, state = model.init(seed=0)
    >>> model.apply(params, state, torch.randn(2, 3, 16, 16))[0].shape
    torch.Size([2, 4, 16, 16])
"""

from __future__ import annotations

from functools import partial

import torch
from torch import Tensor, nn

from ...model.core import Model

__all__ = ["DoubleConv", "UNet", "unet"]


class DoubleConv(nn.Module):
    """(Conv 3x3 -> BatchNorm -> ReLU) twice: the usual block, with the classic bug fixed."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.double_conv = nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.double_conv(x)


class UNet(nn.Module):
    """The imperative twin: encoder of ``DoubleConv`` + max pool, decoder of transposed
    convolutions + concatenated skips + ``DoubleConv``, then a 1x1 classifier.

    Args:
        in_channels: input image channels.
        num_classes: output channels (per-pixel class logits).
        base: width of the first block; each level doubles it.
        depth: number of down-sampling steps (4 in Ronneberger et al.).
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 2, base: int = 64, depth: int = 4):
        super().__init__()
        widths = [base * 2**i for i in range(depth + 1)]
        self.inc = DoubleConv(in_channels, widths[0])
        self.downs = nn.ModuleList(DoubleConv(widths[i], widths[i + 1]) for i in range(depth))
        self.pool = nn.MaxPool2d(2)
        self.ups = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], kernel_size=2, stride=2)
            for i in reversed(range(depth))
        )
        self.up_convs = nn.ModuleList(
            DoubleConv(2 * widths[i], widths[i]) for i in reversed(range(depth))
        )
        self.outc = nn.Conv2d(widths[0], num_classes, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        skips = [self.inc(x)]
        for down in self.downs:
            skips.append(down(self.pool(skips[-1])))
        y = skips.pop()
        for up, conv in zip(self.ups, self.up_convs, strict=True):
            y = conv(torch.cat([skips.pop(), up(y)], dim=1))
        return self.outc(y)


def unet(in_channels: int = 3, num_classes: int = 2, base: int = 64, depth: int = 4) -> Model:
    """Functional :class:`UNet`."""
    return Model(partial(UNet, in_channels, num_classes, base, depth))
