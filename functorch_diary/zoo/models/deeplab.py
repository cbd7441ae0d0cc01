"""DeepLabv3 on a ResNet backbone with ASPP, functional.

The usual DeepLabv3 ``ResNet(block, block_num, num_classes, num_groups=None, weight_std=False)``
is a torchvision-shaped ResNet whose last stage is dilated instead of strided, whose
``fc`` is replaced by ASPP, and whose output is upsampled bilinearly to the input size.
Its options are kept:

- ``weight_std``: every convolution standardises its weight (zero mean, unit std per
  output channel) before convolving (:class:`WSConv2d`, Qiao et al. 2019);
- ``num_groups``: GroupNorm with that many groups instead of BatchNorm;
- ``dilate_last``: the last stage uses dilation 2 instead of stride 2 (output stride 16).

The backbone is ``torchvision.models.ResNet`` itself (its ``replace_stride_with_dilation``
is the seed's ``dilation=2`` stage), so the keys are torchvision's: a ResNet checkpoint
loads into it with :func:`functorch_diary.model.pretrained.load_partial`, which reports
``aspp.*`` as missing and ``fc.*`` as unexpected instead of the seed's silent filter.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import deeplabv3
    >>> model = deeplabv3(num_classes=4, layers=(1, 1, 1, 1), aspp_channels=8, num_groups=4)
    >>> params, state = model.init(seed=0)
    >>> model.apply(params, state, torch.randn(2, 3, 32, 32))[0].shape
    torch.Size([2, 4, 32, 32])
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from ...model.core import Model

__all__ = ["ASPP", "DeepLabV3", "WSConv2d", "deeplabv3"]


class WSConv2d(nn.Conv2d):
    """``nn.Conv2d`` with weight standardisation, as DeepLabv3's ``Conv2d``.

    The weight's mean over (in, kh, kw) is removed and the result divided by its
    (unbiased) standard deviation plus 1e-5; the stored parameter stays the raw weight,
    so the ``state_dict`` keys and shapes are ``nn.Conv2d``'s.
    """

    def forward(self, x: Tensor) -> Tensor:
        weight = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        std = weight.flatten(1).std(dim=1).view(-1, 1, 1, 1) + 1e-5
        return self._conv_forward(x, weight / std, self.bias)


def _standardise_convs(module: nn.Module, keep: nn.Module) -> None:
    """Turn every ``nn.Conv2d`` in ``module`` but ``keep`` into a :class:`WSConv2d`."""
    for sub in module.modules():
        if type(sub) is nn.Conv2d and sub is not keep:
            # Same attributes and parameters; only forward changes, so swapping the class
            # keeps the initialisation and every key.
            sub.__class__ = WSConv2d


class ASPP(nn.Module):
    """Atrous spatial pyramid pooling (DeepLabv3's ``ASPP``): four parallel convolutions
    (1x1 and 3x3 at three dilation rates) and an image-level pooling branch, each
    followed by a norm and ReLU, concatenated, fused by a 1x1 convolution, classified.

    Args:
        in_channels: backbone output channels.
        channels: width of every branch (256 in the paper).
        num_classes: output logits per pixel.
        rates: the three dilation rates (6, 12, 18 for output stride 16).
        norm: ``channels -> norm module``.
    """

    def __init__(
        self,
        in_channels: int,
        channels: int,
        num_classes: int,
        rates: Sequence[int] = (6, 12, 18),
        norm: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        super().__init__()
        self.aspp1 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.aspp2, self.aspp3, self.aspp4 = (
            nn.Conv2d(in_channels, channels, 3, padding=r, dilation=r, bias=False) for r in rates
        )
        self.aspp5 = nn.Conv2d(in_channels, channels, 1, bias=False)
        self.aspp1_bn, self.aspp2_bn, self.aspp3_bn, self.aspp4_bn, self.aspp5_bn = (
            norm(channels) for _ in range(5)
        )
        self.conv2 = nn.Conv2d(5 * channels, channels, 1, bias=False)
        self.bn2 = norm(channels)
        self.conv3 = nn.Conv2d(channels, num_classes, 1)
        self.relu = nn.ReLU(inplace=True)

    def features(self, x: Tensor) -> Tensor:
        """The fused branches before the classifier (``channels`` wide): what a
        DeepLabv3+ decoder upsamples and joins with low-level features."""
        branches = [
            self.relu(bn(conv(x)))
            for conv, bn in (
                (self.aspp1, self.aspp1_bn),
                (self.aspp2, self.aspp2_bn),
                (self.aspp3, self.aspp3_bn),
                (self.aspp4, self.aspp4_bn),
            )
        ]
        pooled = self.relu(self.aspp5_bn(self.aspp5(F.adaptive_avg_pool2d(x, 1))))
        branches.append(
            F.interpolate(pooled, size=x.shape[2:], mode="bilinear", align_corners=True)
        )
        return self.relu(self.bn2(self.conv2(torch.cat(branches, dim=1))))

    def forward(self, x: Tensor) -> Tensor:
        return self.conv3(self.features(x))


class DeepLabV3(ResNet):
    """The imperative twin: a torchvision ``ResNet`` whose ``avgpool``/``fc`` became ASPP.

    Args:
        block: ``Bottleneck`` (ResNet-50/101/152) or ``BasicBlock`` (18/34).
        layers: blocks per stage, e.g. ``(3, 8, 36, 3)`` for ResNet-152 (the tutorial's).
        num_classes: segmentation classes.
        num_groups: GroupNorm groups instead of BatchNorm (``None``: BatchNorm).
        weight_std: weight-standardised convolutions everywhere (backbone and ASPP).
        dilate_last: dilate the last stage instead of striding it.
        aspp_channels: ASPP branch width.
        aspp_rates: ASPP dilation rates.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck] = Bottleneck,
        layers: Sequence[int] = (3, 4, 6, 3),
        num_classes: int = 21,
        *,
        num_groups: int | None = None,
        weight_std: bool = False,
        dilate_last: bool = True,
        aspp_channels: int = 256,
        aspp_rates: Sequence[int] = (6, 12, 18),
    ):
        norm: Callable[[int], nn.Module] = (
            nn.BatchNorm2d if num_groups is None else partial(nn.GroupNorm, num_groups)
        )
        super().__init__(
            block,
            list(layers),
            norm_layer=norm,
            replace_stride_with_dilation=[False, False, dilate_last],
        )
        del self.avgpool, self.fc
        self.aspp = ASPP(512 * block.expansion, aspp_channels, num_classes, aspp_rates, norm)
        # The tutorial's init: conv weights N(0, sqrt(2 / (k*k*out))) (kaiming fan_out), norms
        # weight 1 bias 0, like torchvision's ResNet init of the backbone.
        for m in self.aspp.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
        if weight_std:
            # The seed standardises every convolution but the final classifier.
            _standardise_convs(self, keep=self.aspp.conv3)

    def forward(self, x: Tensor) -> Tensor:
        size = x.shape[2:]
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return F.interpolate(self.aspp(x), size=size, mode="bilinear", align_corners=True)


_BLOCKS = {"bottleneck": Bottleneck, "basic": BasicBlock}


def deeplabv3(
    num_classes: int = 21,
    layers: Sequence[int] = (3, 4, 6, 3),
    *,
    block: str = "bottleneck",
    num_groups: int | None = None,
    weight_std: bool = False,
    dilate_last: bool = True,
    aspp_channels: int = 256,
    aspp_rates: Sequence[int] = (6, 12, 18),
) -> Model:
    """Functional :class:`DeepLabV3`; ``layers=(3, 8, 36, 3)`` is the tutorial's ResNet-152.

    ``block`` is ``"bottleneck"`` (ResNet-50 and deeper) or ``"basic"`` (ResNet-18/34,
    with ``dilate_last=False``); the other arguments are :class:`DeepLabV3`'s.
    """
    if block not in _BLOCKS:
        raise ValueError(f"block must be one of {sorted(_BLOCKS)}, got {block!r}")
    if block == "basic" and dilate_last:
        raise ValueError("torchvision's BasicBlock cannot dilate: pass dilate_last=False")
    return Model(
        partial(
            DeepLabV3,
            _BLOCKS[block],
            tuple(layers),
            num_classes,
            num_groups=num_groups,
            weight_std=weight_std,
            dilate_last=dilate_last,
            aspp_channels=aspp_channels,
            aspp_rates=tuple(aspp_rates),
        )
    )
