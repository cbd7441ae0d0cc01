"""VGG16 for CIFAR and VGG19 for style transfer, built by torchvision.

The imperative twin is ``torchvision.models.VGG``: with the default options the module
is exactly ``torchvision.models.vgg16(num_classes=...)`` (or ``vgg16_bn``), same layers,
same initialisation, same ``state_dict`` keys, so torchvision's pretrained file loads
into ``params`` unchanged.

Three options make the CIFAR-sized network: ``pool_size`` (torchvision
pools to 7x7, which on a 32x32 image copies one 1x1 feature map 49 times into a
25088-wide classifier; 1 keeps the 512 features as they are), ``hidden`` (the width of
the two hidden classifier layers) and ``width_divisor`` (every convolution's width
divided by it: small models for tests). Changing any of them keeps every key name.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import vgg16
    >>> model = vgg16(num_classes=10, batch_norm=True, pool_size=1, hidden=64, width_divisor=16)
    >>> params, state = model.init(seed=0)
    >>> tuple(params["classifier.0.weight"].shape)
    (64, 32)
    >>> model.apply(params, state, torch.randn(2, 3, 32, 32))[0].shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models import vgg as tv_vgg

from ...model.core import Model

__all__ = ["CifarVGG", "vgg16", "vgg19", "vgg_module"]

_CONFIGS = {16: "D", 19: "E"}


class CifarVGG(tv_vgg.VGG):
    """torchvision's ``VGG`` with a configurable pool size and classifier width.

    Same attributes (``features``, ``avgpool``, ``classifier``), forward and
    initialisation as ``torchvision.models.VGG``; only the sizes differ. Built directly,
    not by shrinking a torchvision VGG, so the 25088x4096 layer is never allocated.

    Args:
        features: the convolutional part (``torchvision.models.vgg.make_layers``).
        channels: the last convolution's width.
        num_classes, pool_size, hidden, dropout: as for :func:`vgg_module`.
    """

    def __init__(
        self,
        features: nn.Module,
        channels: int,
        num_classes: int,
        pool_size: int,
        hidden: int,
        dropout: float,
    ):
        nn.Module.__init__(self)
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((pool_size, pool_size))
        self.classifier = nn.Sequential(
            nn.Linear(channels * pool_size * pool_size, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(hidden, num_classes),
        )
        # torchvision's VGG initialisation, module by module in the same order.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.constant_(m.bias, 0)


def vgg_module(
    depth: int,
    num_classes: int = 10,
    batch_norm: bool = False,
    *,
    pool_size: int = 7,
    hidden: int = 4096,
    dropout: float = 0.5,
    width_divisor: int = 1,
) -> tv_vgg.VGG:
    """The imperative twin: a ``torchvision.models.VGG`` of depth 16 or 19.

    Args:
        depth: 16 (configuration "D") or 19 ("E").
        num_classes: width of the last classifier layer.
        batch_norm: a BatchNorm after every convolution (``vgg16_bn``).
        pool_size: side of the adaptive average pool before the classifier.
        hidden: width of the two hidden classifier layers.
        dropout: dropout probability in the classifier.
        width_divisor: every convolution width is divided by this.

    Returns:
        With the default sizes, ``torchvision.models.VGG`` itself (so ``init`` gives
        torchvision's weights for a seed); otherwise a :class:`CifarVGG`.
    """
    if depth not in _CONFIGS:
        raise ValueError(f"VGG depth must be 16 or 19, got {depth}")
    cfg = [v if v == "M" else int(v) // width_divisor for v in tv_vgg.cfgs[_CONFIGS[depth]]]
    features = tv_vgg.make_layers(cfg, batch_norm=batch_norm)
    if (pool_size, hidden, width_divisor) == (7, 4096, 1):
        return tv_vgg.VGG(features, num_classes, dropout=dropout)
    # cfg ends with "M"; the entry before it is the last convolution's width.
    return CifarVGG(features, int(cfg[-2]), num_classes, pool_size, hidden, dropout)


def vgg16(
    num_classes: int = 10,
    batch_norm: bool = False,
    *,
    pool_size: int = 7,
    hidden: int = 4096,
    dropout: float = 0.5,
    width_divisor: int = 1,
) -> Model:
    """Functional VGG16; the options are :func:`vgg_module`'s."""
    return Model(
        partial(
            vgg_module,
            16,
            num_classes,
            batch_norm,
            pool_size=pool_size,
            hidden=hidden,
            dropout=dropout,
            width_divisor=width_divisor,
        )
    )


def vgg19(
    num_classes: int = 1000,
    batch_norm: bool = False,
    *,
    pool_size: int = 7,
    hidden: int = 4096,
    dropout: float = 0.5,
    width_divisor: int = 1,
) -> Model:
    """Functional VGG19 (the style-transfer backbone); the options are :func:`vgg_module`'s."""
    return Model(
        partial(
            vgg_module,
            19,
            num_classes,
            batch_norm,
            pool_size=pool_size,
            hidden=hidden,
            dropout=dropout,
            width_divisor=width_divisor,
        )
    )
