"""DenseNet-BC for CIFAR and DenseNet-121 for ImageNet.

Both are ``torchvision.models.DenseNet``, so they share its keys
(``features.denseblock1.denselayer1.norm1.weight``, ...) and DenseNet-121 loads
torchvision's ``state_dict`` unchanged.

DenseNet-BC (Huang et al. 2017, section 3) for 32x32 images has three dense blocks of
``(depth - 4) // 6`` bottleneck layers, a 3x3 stride-1 first convolution of
``2 * growth_rate`` channels, and compression 0.5 in the transitions. torchvision's
DenseNet already has bottlenecks (``bn_size=4``) and halving transitions; only its ImageNet
stem (7x7/2 convolution, BatchNorm, ReLU, 3x3/2 max pool) is replaced: the convolution
becomes 3x3/1 and the other three go, since every dense layer starts with its own
BatchNorm and ReLU.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import densenet_bc
    >>> model = densenet_bc(depth=10, growth_rate=4, num_classes=10)
    >>> params, state = model.init(seed=0)
    >>> model.apply(params, state, torch.randn(2, 3, 32, 32))[0].shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from functools import partial

from torch import nn
from torchvision.models import densenet as tv_densenet

from ...model.core import Model

__all__ = ["densenet121", "densenet121_module", "densenet_bc", "densenet_bc_module"]


def densenet_bc_module(
    depth: int = 100, growth_rate: int = 12, num_classes: int = 10, drop_rate: float = 0.0
) -> tv_densenet.DenseNet:
    """The imperative twin of :func:`densenet_bc`: a CIFAR-stem ``torchvision`` DenseNet.

    Args:
        depth: total depth ``L``; ``(L - 4)`` must be divisible by 6 (100 gives 16 layers
            per block, the paper's 0.8M-parameter network for ``growth_rate=12``).
        growth_rate: channels each dense layer adds (``k``).
        num_classes: width of the classifier.
        drop_rate: dropout after each dense layer (0 in the CIFAR recipe).

    Returns:
        The module, initialised as torchvision initialises DenseNet.
    """
    if depth < 10 or (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4 with n >= 1, got {depth}")
    per_block = (depth - 4) // 6
    net = tv_densenet.DenseNet(
        growth_rate=growth_rate,
        block_config=(per_block, per_block, per_block),
        num_init_features=2 * growth_rate,
        bn_size=4,
        drop_rate=drop_rate,
        num_classes=num_classes,
    )
    features = net.features
    features.conv0 = nn.Conv2d(3, 2 * growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(features.conv0.weight)  # torchvision's DenseNet conv init
    del features.norm0, features.relu0, features.pool0
    return net


def densenet_bc(
    depth: int = 100, growth_rate: int = 12, num_classes: int = 10, drop_rate: float = 0.0
) -> Model:
    """Functional DenseNet-BC for 32x32 images; see :func:`densenet_bc_module`."""
    return Model(partial(densenet_bc_module, depth, growth_rate, num_classes, drop_rate))


def densenet121_module(num_classes: int = 1000) -> tv_densenet.DenseNet:
    """The imperative twin of :func:`densenet121`: ``torchvision.models.densenet121``."""
    return tv_densenet.densenet121(num_classes=num_classes)


def densenet121(num_classes: int = 1000) -> Model:
    """Functional DenseNet-121 (ImageNet stem, growth 32, blocks 6/12/24/16)."""
    return Model(partial(densenet121_module, num_classes))
