"""ResNet-18/34/50 (for CIFAR or ImageNet), built by torchvision.

The imperative twin *is* ``torchvision.models.ResNet``: the functional model wraps
torchvision's own factory, so ``params``/``state`` carry torchvision's ``state_dict`` keys
and a torchvision checkpoint loads with no renaming.

For 32x32 CIFAR images the 7x7 stride-2 stem and its max pool would shrink the image to
8x8 before the first block; ``cifar_stem=True`` replaces them with one 3x3 stride-1
convolution and no pool (He et al. 2016, section 4.2), keeping every key name, so only
``conv1.weight`` changes shape.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import resnet18
    >>> model = resnet18(num_classes=10)
    >>> params, state = model.init(seed=0)
    >>> tuple(params["conv1.weight"].shape)
    (64, 3, 3, 3)
    >>> model.apply(params, state, torch.randn(2, 3, 32, 32))[0].shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

from torch import nn
from torchvision.models import resnet as tv_resnet

from ...model.core import Model

__all__ = ["resnet18", "resnet34", "resnet50", "resnet_module"]

_FACTORIES: dict[int, Callable[..., tv_resnet.ResNet]] = {
    18: tv_resnet.resnet18,
    34: tv_resnet.resnet34,
    50: tv_resnet.resnet50,
}


def resnet_module(depth: int, num_classes: int = 10, cifar_stem: bool = True) -> tv_resnet.ResNet:
    """The imperative twin: torchvision's ResNet-``depth``, optionally with the CIFAR stem.

    Args:
        depth: 18, 34 or 50.
        num_classes: width of the final ``fc`` layer.
        cifar_stem: replace the 7x7/2 convolution and 3x3/2 max pool by a 3x3/1
            convolution and nothing (for 32x32 inputs).

    Returns:
        A ``torchvision.models.ResNet`` initialised exactly as torchvision initialises it.
    """
    if depth not in _FACTORIES:
        raise ValueError(f"ResNet depth must be one of {sorted(_FACTORIES)}, got {depth}")
    net = _FACTORIES[depth](num_classes=num_classes)
    if cifar_stem:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        # torchvision initialises every conv this way; the new stem must not be the odd one out.
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
        net.maxpool = nn.Identity()
    return net


def resnet18(num_classes: int = 10, cifar_stem: bool = True) -> Model:
    """Functional ResNet-18 (BasicBlock, [2, 2, 2, 2]); see :func:`resnet_module`."""
    return Model(partial(resnet_module, 18, num_classes, cifar_stem))


def resnet34(num_classes: int = 10, cifar_stem: bool = True) -> Model:
    """Functional ResNet-34 (BasicBlock, [3, 4, 6, 3]); see :func:`resnet_module`."""
    return Model(partial(resnet_module, 34, num_classes, cifar_stem))


def resnet50(num_classes: int = 10, cifar_stem: bool = True) -> Model:
    """Functional ResNet-50 (Bottleneck, [3, 4, 6, 3]); see :func:`resnet_module`."""
    return Model(partial(resnet_module, 50, num_classes, cifar_stem))
