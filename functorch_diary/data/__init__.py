"""Data that needs no download: bundled digits, local MNIST IDX and CIFAR-10 files, batching."""

from .batches import batches
from .cifar import CIFAR10_FILES, cifar10_split, load_cifar10
from .digits import digits_batch, load_digits
from .mnist import MNIST_FILES, load_mnist_idx
from .split import Split

__all__ = [
    "CIFAR10_FILES",
    "MNIST_FILES",
    "Split",
    "batches",
    "cifar10_split",
    "digits_batch",
    "load_cifar10",
    "load_digits",
    "load_mnist_idx",
]
