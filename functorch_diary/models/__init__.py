"""The diaries' networks: each an ``nn.Module`` (the imperative twin) and a ``Model``."""

from .lenet import LeNet, lenet
from .mlp import MLP, mlp
from .regression import LogisticRegression, linear_regression, logistic_regression

__all__ = [
    "MLP",
    "LeNet",
    "LogisticRegression",
    "lenet",
    "linear_regression",
    "logistic_regression",
    "mlp",
]
