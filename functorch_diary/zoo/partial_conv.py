"""Partial convolution (Liu et al. 2018, image inpainting), the inpainting ``PartialConv``.

A convolution that sees only the valid pixels (``mask == 1``) and renormalises by how
many it saw; every output that saw at least one valid pixel becomes valid in the next
mask::

    out = (W * (x . M) - b) / sum(M in the window) + b     where sum > 0, else 0
    new_mask = 1                                           where sum > 0, else 0

The inpainting code writes it as a module with a second, frozen ``nn.Conv2d`` of ones
(``mask_conv``, ``requires_grad = False``) and in-place ``masked_fill_`` under
``torch.no_grad()``. The functional form, :func:`partial_conv2d`, is a pure function of
``(x, mask, weight, bias)``: the window sums are a convolution with a constant kernel of
ones made on the fly (a constant, not a parameter, so no optimiser can touch it and no
``requires_grad`` flag is needed), and nothing is written in place.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.partial_conv import partial_conv
    >>> model = partial_conv(1, 2, 3, padding=1)
    >>> params, state = model.init(seed=0)
    >>> mask = torch.ones(1, 1, 5, 5)
    >>> mask[..., :, :3] = 0  # a hole three columns wide
    >>> (out, new_mask), _ = model.apply(params, state, torch.randn(1, 1, 5, 5), mask)
    >>> new_mask[0, 0, 0].tolist()  # the hole shrinks by one pixel per layer
    [0.0, 0.0, 1.0, 1.0, 1.0]
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..model.core import Model

__all__ = ["PartialConv", "PartialConv2d", "partial_conv", "partial_conv2d"]

IntOrPair = int | tuple[int, int]


def partial_conv2d(
    x: Tensor,
    mask: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
) -> tuple[Tensor, Tensor]:
    """The partial convolution of ``x`` under ``mask``: ``(output, new_mask)``.

    Args:
        x: input ``(N, C_in, H, W)``.
        mask: 1 for valid pixels, 0 for holes; the shape of ``x``.
        weight, bias: the convolution's parameters (``bias`` may be None).
        stride, padding, dilation, groups: as for ``F.conv2d``.

    Returns:
        ``output`` ``(N, C_out, H', W')`` (zero where the window held no valid pixel) and
        ``new_mask`` of the same shape (1 where it held one). No gradient flows into the
        mask.

    Example:
        >>> import torch
        >>> out, new_mask = partial_conv2d(torch.ones(1, 1, 3, 3), torch.ones(1, 1, 3, 3),
        ...                                torch.ones(1, 1, 2, 2))
        >>> out.flatten().tolist(), new_mask.flatten().tolist()
        ([1.0, 1.0, 1.0, 1.0], [1.0, 1.0, 1.0, 1.0])
    """
    output = F.conv2d(x * mask, weight, bias, stride, padding, dilation, groups)
    output_bias = (
        torch.zeros_like(output) if bias is None else bias.view(1, -1, 1, 1).expand_as(output)
    )
    # Valid pixels per window: the seed's frozen conv of ones, as a constant kernel.
    ones = torch.ones_like(weight).detach()
    mask_sum = F.conv2d(mask.detach(), ones, None, stride, padding, dilation, groups)
    holes = mask_sum == 0
    mask_sum = mask_sum.masked_fill(holes, 1.0)
    output = ((output - output_bias) / mask_sum + output_bias).masked_fill(holes, 0.0)
    new_mask = torch.ones_like(output).masked_fill(holes, 0.0)
    return output, new_mask


def _kaiming_init(conv: nn.Conv2d) -> None:
    """The inpainting code's ``weights_init('kaiming')``: He normal (fan in) weights, zero bias."""
    nn.init.kaiming_normal_(conv.weight, a=0, mode="fan_in")
    if conv.bias is not None:
        nn.init.constant_(conv.bias, 0.0)


class PartialConv(nn.Module):
    """The imperative twin: ``PartialConv`` as the inpainting code writes it.

    A trainable ``input_conv`` and a frozen ``mask_conv`` of ones (a parameter with
    ``requires_grad=False``); ``forward(input, mask) -> (output, new_mask)``.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.input_conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        self.mask_conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, False
        )
        self.input_conv.apply(lambda m: _kaiming_init(m) if isinstance(m, nn.Conv2d) else None)
        torch.nn.init.constant_(self.mask_conv.weight, 1.0)
        for param in self.mask_conv.parameters():
            param.requires_grad = False

    def forward(self, input: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        output = self.input_conv(input * mask)
        if self.input_conv.bias is not None:
            output_bias = self.input_conv.bias.view(1, -1, 1, 1).expand_as(output)
        else:
            output_bias = torch.zeros_like(output)
        with torch.no_grad():
            output_mask = self.mask_conv(mask)
        no_update_holes = output_mask == 0
        mask_sum = output_mask.masked_fill_(no_update_holes, 1.0)
        output_pre = (output - output_bias) / mask_sum + output_bias
        output = output_pre.masked_fill_(no_update_holes, 0.0)
        new_mask = torch.ones_like(output)
        new_mask = new_mask.masked_fill_(no_update_holes, 0.0)
        return output, new_mask


class PartialConv2d(nn.Module):
    """The module :func:`partial_conv` wraps: only ``input_conv`` (keys as the seed's), the
    window sums computed by :func:`partial_conv2d` from a constant kernel."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntOrPair,
        stride: IntOrPair = 1,
        padding: IntOrPair = 0,
        dilation: IntOrPair = 1,
        groups: int = 1,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.input_conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias
        )
        _kaiming_init(self.input_conv)

    def forward(self, input: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
        conv = self.input_conv
        return partial_conv2d(
            input,
            mask,
            conv.weight,
            conv.bias,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
        )


def partial_conv(
    in_channels: int,
    out_channels: int,
    kernel_size: IntOrPair,
    stride: IntOrPair = 1,
    padding: IntOrPair = 0,
    dilation: IntOrPair = 1,
    groups: int = 1,
    bias: bool = True,
) -> Model:
    """A partial convolution as a :class:`Model`: ``apply(params, state, x, mask)`` returns
    ``((output, new_mask), state)``; params ``input_conv.weight`` / ``input_conv.bias``
    load from the seed's module ``state_dict`` (its ``mask_conv.weight`` of ones is not
    needed)."""
    return Model(
        partial(
            PartialConv2d,
            in_channels,
            out_channels,
            kernel_size,
            stride,
            padding,
            dilation,
            groups,
            bias,
        )
    )
