"""CIFAR-10 recipes: ResNet-18, VGG16 and DenseNet-BC, trained the classic way.

The usual CIFAR schedule, SGD with momentum and step decay, for all three::

    optimizer = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[50000, 75000], gamma=0.1)

Those milestones are absolute step counts; here they sit at 50% and 75% of the run,
so they scale with ``--epochs``. VGG16 takes the usual CIFAR setting for a
16-layer plain network: BatchNorm, lr 0.05, weight decay 5e-4. Training batches get the
standard CIFAR augmentation (random 4-pixel-padded crop, horizontal flip), drawn from the
step's explicit key.

The data is read from ``--data-dir`` (the python-pickle batches); there is no default.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from ... import prng
from ...data.cifar import CIFAR10_FILES, cifar10_split
from ...data.split import Split
from ...optim import GradientTransformation, multistep_lr, sgd
from ...zoo.models import densenet_bc, resnet18, vgg16
from .base import Recipe

__all__ = ["RECIPES", "augment_cifar", "load_cifar_data"]


def load_cifar_data(data_dir: Path | None) -> Split:
    """CIFAR-10 from ``data_dir``, standardised per channel.

    Raises:
        FileNotFoundError: ``data_dir`` is ``None`` or lacks some of the seven files.
    """
    if data_dir is None:
        raise FileNotFoundError(
            "the CIFAR-10 recipes need --data-dir: a folder with the python batches "
            f"({', '.join(CIFAR10_FILES)}), e.g. the cifar-10-batches-py folder of "
            "cifar-10-python.tar.gz; nothing is downloaded"
        )
    return cifar10_split(data_dir)


def augment_cifar(
    images: Tensor, labels: Tensor, key: Tensor, padding: int = 4
) -> tuple[Tensor, Tensor]:
    """Random crop of the zero-padded image and random horizontal flip, per image.

    A pure function of ``(images, key)``: the same key gives the same crops and flips,
    with no global random state (so it runs under ``torch.compile`` and ``vmap``). The
    labels pass through: neither transform changes a class.

    Args:
        images: (N, C, H, W).
        labels: (N,) classes, returned as they are.
        key: a :func:`~functorch_diary.prng.key`.
        padding: the largest shift in pixels.

    Returns:
        A new (N, C, H, W) tensor, and ``labels``.

    Example:
        >>> import torch
        >>> from functorch_diary import prng
        >>> x, y = torch.randn(4, 3, 8, 8), torch.arange(4)
        >>> a, b = augment_cifar(x, y, prng.key(0)), augment_cifar(x, y, prng.key(0))
        >>> torch.equal(a[0], b[0]), a[1] is y
        (True, True)
    """
    n, c, h, w = images.shape
    draws = prng.uniform(key, (3, n), dtype=torch.float64)
    span = 2 * padding + 1
    dy = (draws[0] * span).long()  # top-left corner of the crop in the padded image
    dx = (draws[1] * span).long()
    flip = draws[2] < 0.5
    padded = F.pad(images, (padding, padding, padding, padding))
    rows = dy[:, None] + torch.arange(h, device=images.device)  # (N, H)
    cols = dx[:, None] + torch.arange(w, device=images.device)  # (N, W)
    # Mirror the column indices instead of the pixels: one gather does crop and flip.
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    out = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * padding))
    return out.gather(3, cols[:, None, None, :].expand(n, c, h, w)), labels


def _sgd_multistep(weight_decay: float, lr: float, total_steps: int) -> GradientTransformation:
    milestones = [total_steps // 2, (3 * total_steps) // 4]
    return sgd(multistep_lr(lr, milestones, gamma=0.1), momentum=0.9, weight_decay=weight_decay)


RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="resnet",
            description="ResNet-18 (CIFAR stem) on CIFAR-10, SGD 0.9 + wd 1e-4, MultiStepLR",
            build_model=partial(resnet18, 10),
            load_data=load_cifar_data,
            make_optimizer=partial(_sgd_multistep, 1e-4),
            epochs=60,
            batch_size=128,
            lr=0.1,
            augment=augment_cifar,
        ),
        Recipe(
            name="vgg",
            description="VGG16-BN (512-512 head) on CIFAR-10, SGD 0.9 + wd 5e-4, MultiStepLR",
            build_model=partial(vgg16, 10, True, pool_size=1, hidden=512),
            load_data=load_cifar_data,
            make_optimizer=partial(_sgd_multistep, 5e-4),
            epochs=60,
            batch_size=128,
            lr=0.05,
            augment=augment_cifar,
        ),
        Recipe(
            name="densenet",
            description="DenseNet-BC (L=100, k=12) on CIFAR-10, SGD 0.9 + wd 1e-4, MultiStepLR",
            build_model=partial(densenet_bc, 100, 12, 10),
            load_data=load_cifar_data,
            make_optimizer=partial(_sgd_multistep, 1e-4),
            epochs=100,
            batch_size=64,
            lr=0.1,
            augment=augment_cifar,
        ),
    )
}
