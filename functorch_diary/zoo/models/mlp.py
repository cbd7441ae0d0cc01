"""The classic MNIST MLP: 784 -> 256 -> ReLU -> 10, sizes configurable.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import mlp
    >>> model = mlp(in_features=64, hidden=(32,), num_classes=10)
    >>> params, state = model.init(seed=0)
    >>> model.apply(params, state, torch.randn(5, 64))[0].shape
    torch.Size([5, 10])
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from itertools import pairwise

from torch import Tensor, nn

from ...model.core import Model

__all__ = ["MLP", "mlp"]


class MLP(nn.Module):
    """Fully connected layers with ReLU between them; inputs are flattened first."""

    def __init__(
        self, in_features: int = 784, hidden: Sequence[int] = (256,), num_classes: int = 10
    ):
        super().__init__()
        widths = [in_features, *hidden]
        layers: list[nn.Module] = [nn.Flatten()]
        for fan_in, fan_out in pairwise(widths):
            layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
        layers.append(nn.Linear(widths[-1], num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def mlp(in_features: int = 784, hidden: Sequence[int] = (256,), num_classes: int = 10) -> Model:
    """The functional :class:`MLP`."""
    return Model(partial(MLP, in_features, tuple(hidden), num_classes))
