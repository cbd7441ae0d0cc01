"""Data that needs no download: bundled digits, synthetic segmentation/detection sets, local
MNIST IDX, CIFAR-10, PNG/JPEG files, image folders and VOC/COCO boxes, batching, pure
augmentation."""

from . import augment, folders, images, synthetic
from .batches import batches
from .cifar import CIFAR10_FILES, cifar10_split, load_cifar10
from .digits import digits_batch, load_digits
from .mnist import MNIST_FILES, load_mnist_idx
from .split import Split

__all__ = [
    "CIFAR10_FILES",
    "MNIST_FILES",
    "Split",
    "augment",
    "batches",
    "cifar10_split",
    "digits_batch",
    "folders",
    "images",
    "load_cifar10",
    "load_digits",
    "load_mnist_idx",
    "synthetic",
]
