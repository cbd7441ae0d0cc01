"""The first examples of any course: linear regression and logistic regression.

Both are one ``nn.Linear``; logistic regression flattens its input and is trained with
cross entropy on its logits (the softmax lives in the loss).

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import linear_regression
    >>> model = linear_regression(1, 1)
    >>> params, state = model.init(seed=0)
    >>> sorted(params)
    ['bias', 'weight']
"""

from __future__ import annotations

from functools import partial

from torch import nn

from ...model.core import Model

__all__ = ["LogisticRegression", "linear_regression", "logistic_regression"]


class LogisticRegression(nn.Module):
    """``Linear(in_features, num_classes)`` on flattened inputs; returns logits."""

    def __init__(self, in_features: int = 784, num_classes: int = 10):
        super().__init__()
        self.linear = nn.Linear(in_features, num_classes)

    def forward(self, x):
        return self.linear(x.flatten(1))


def linear_regression(in_features: int = 1, out_features: int = 1) -> Model:
    """``y = W x + b`` as a :class:`Model`: linear regression."""
    return Model(partial(nn.Linear, in_features, out_features))


def logistic_regression(in_features: int = 784, num_classes: int = 10) -> Model:
    """Softmax (multinomial logistic) regression logits."""
    return Model(partial(LogisticRegression, in_features, num_classes))
