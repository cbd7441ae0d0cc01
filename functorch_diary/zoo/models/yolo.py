"""YOLO v1: a 24-layer convolutional backbone and a fully connected head.

The backbone follows Redmon et al. (2016, figure 3): 24 convolutions with 1x1 reductions
and max pools, total stride 64, so a 448x448 image gives the 7x7 grid. Each convolution
is followed by BatchNorm (added in YOLO v2, and what reimplementations train with) and
LeakyReLU(0.1). The head flattens the grid, maps it to ``hidden`` features and then to
``S x S x (5B + C)`` numbers, returned as an ``(N, S, S, C + 5B)`` tensor laid out for
:func:`functorch_diary.zoo.losses.yolo_v1_loss` (class scores first, then B boxes of
``x, y, w, h, confidence``).

``total_stride`` adapts the backbone to small images without changing a key: 32 gives
the 3x3 convolution that strides by 2 (the 21st) stride 1, 16 does the same to the 7x7
stem; a 64x64 image then gets a 4x4 grid.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import yolo_v1
    >>> model = yolo_v1(num_classes=3, image_size=128, width_divisor=16, hidden=32)
    >>> params, state = model.init(seed=0)
    >>> model.apply(params, state, torch.randn(2, 3, 128, 128))[0].shape
    torch.Size([2, 2, 2, 13])
"""

from __future__ import annotations

from functools import partial

from einops import rearrange
from torch import Tensor, nn

from ...model.core import Model

__all__ = ["YoloV1", "yolo_v1"]

# (kernel, out_channels, stride) per convolution; "M" is a 2x2/2 max pool; a list repeats
# its convolutions the given number of times. This is the paper's figure 3.
_ARCHITECTURE: list = [
    (7, 64, 2), "M",
    (3, 192, 1), "M",
    (1, 128, 1), (3, 256, 1), (1, 256, 1), (3, 512, 1), "M",
    [(1, 256, 1), (3, 512, 1), 4], (1, 512, 1), (3, 1024, 1), "M",
    [(1, 512, 1), (3, 1024, 1), 2], (3, 1024, 1), (3, 1024, 2),
    (3, 1024, 1), (3, 1024, 1),
]  # fmt: skip


# Which strided convolutions (1 = the 7x7 stem, 2 = the 21st) run at stride 1.
_UNSTRIDED = {64: (), 32: (2,), 16: (1, 2)}


def _convolutions() -> list[tuple[int, int, int] | str]:
    flat: list[tuple[int, int, int] | str] = []
    for item in _ARCHITECTURE:
        if isinstance(item, list):
            *convs, repeats = item
            flat += convs * repeats
        else:
            flat.append(item)
    return flat


class YoloV1(nn.Module):
    """The imperative twin.

    Args:
        num_classes: C (20 for PASCAL VOC).
        boxes: B, boxes predicted per cell.
        image_size: input side; must be divisible by 64, the grid is ``image_size // 64``.
        width_divisor: every convolution width is divided by this (small test models).
        hidden: width of the head's hidden layer (4096 in the paper).
        dropout: dropout after the hidden layer (0.5 in the paper).
        total_stride: 64 (the paper), 32 or 16: the backbone's strided convolutions
            become stride 1, the last first, to keep a finer grid on small images.
    """

    def __init__(
        self,
        num_classes: int = 20,
        boxes: int = 2,
        image_size: int = 448,
        width_divisor: int = 1,
        hidden: int = 4096,
        dropout: float = 0.5,
        total_stride: int = 64,
    ):
        super().__init__()
        if total_stride not in _UNSTRIDED:
            raise ValueError(f"total_stride must be 64, 32 or 16, got {total_stride}")
        if image_size % total_stride:
            raise ValueError(
                f"image_size must be divisible by {total_stride} (the total stride), "
                f"got {image_size}"
            )
        self.grid, self.per_cell = image_size // total_stride, num_classes + 5 * boxes
        layers: list[nn.Module] = []
        channels = 3
        strided = 0
        for item in _convolutions():
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            kernel, width, stride = item
            if stride == 2:
                strided += 1
                stride = 1 if strided in _UNSTRIDED[total_stride] else 2
            width //= width_divisor
            layers += [
                nn.Conv2d(channels, width, kernel, stride, padding=kernel // 2, bias=False),
                nn.BatchNorm2d(width),
                nn.LeakyReLU(0.1),
            ]
            channels = width
        self.backbone = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(channels * self.grid * self.grid, hidden),
            nn.LeakyReLU(0.1),
            nn.Dropout(dropout),
            nn.Linear(hidden, self.grid * self.grid * self.per_cell),
        )

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(self.backbone(x))
        return rearrange(out, "n (h w k) -> n h w k", h=self.grid, w=self.grid)


def yolo_v1(
    num_classes: int = 20,
    boxes: int = 2,
    image_size: int = 448,
    width_divisor: int = 1,
    hidden: int = 4096,
    dropout: float = 0.5,
    total_stride: int = 64,
) -> Model:
    """Functional :class:`YoloV1`; train it with :func:`~functorch_diary.losses.yolo_v1_loss`."""
    return Model(
        partial(
            YoloV1, num_classes, boxes, image_size, width_divisor, hidden, dropout, total_stride
        )
    )
