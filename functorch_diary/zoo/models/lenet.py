"""LeNet-5 in its classic ``nn.Sequential`` form.

Sigmoid activations and max pooling, for 1x28x28 inputs (16*4*4 features after the
convolutions). The digits CLI upsamples scikit-learn's 8x8 digits to 28x28 to use it
unchanged.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import lenet
    >>> model = lenet()
    >>> params, state = model.init(seed=0)
    >>> sorted(params)[:2]
    ['conv.0.bias', 'conv.0.weight']
    >>> model.apply(params, state, torch.randn(2, 1, 28, 28))[0].shape
    torch.Size([2, 10])
"""

from __future__ import annotations

from functools import partial

from torch import Tensor, nn

from ...model.core import Model

__all__ = ["LeNet", "lenet"]


class LeNet(nn.Module):
    """The imperative twin: LeNet-5, with ``num_classes`` configurable."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 6, 5),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
            nn.Conv2d(6, 16, 5),
            nn.Sigmoid(),
            nn.MaxPool2d(2, 2),
        )
        self.fc = nn.Sequential(
            nn.Linear(16 * 4 * 4, 120),
            nn.Sigmoid(),
            nn.Linear(120, 84),
            nn.Sigmoid(),
            nn.Linear(84, num_classes),
        )

    def forward(self, img: Tensor) -> Tensor:
        feature = self.conv(img)
        return self.fc(feature.view(img.shape[0], -1))


def lenet(num_classes: int = 10) -> Model:
    """The functional :class:`LeNet`."""
    return Model(partial(LeNet, num_classes))
