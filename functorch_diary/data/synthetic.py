"""Segmentation and detection data generated from a seed: shapes on textured backgrounds.

Nothing to download and nothing random outside the seed: each set is drawn from a
``torch.Generator`` local to the function, so the same arguments give the same tensors
on every machine. Shapes (disc, square, triangle) get random colours, so a model must
learn their outlines, not a colour code; the background is smooth noise plus stripes of
random frequency and orientation, plus pixel noise.

- :func:`segmentation_set`: ``(N, 3, H, W)`` float images in [0, 1] and ``(N, H, W)``
  int64 class-index masks (0 background, ``1 + shape``), the format ``cross_entropy``
  takes.
- :func:`detection_set`: images with a few non-overlapping objects, their boxes in
  torchvision's XYXY pixel format (``x2``/``y2`` exclusive) and their labels
  (``0 .. 2``), padded to ``max_objects`` per image with label ``-1``
  (:func:`unpad_boxes` gives the per-image lists torchvision's detection API uses).

Example:
    >>> from functorch_diary.data.synthetic import detection_set, segmentation_set
    >>> seg = segmentation_set(8, size=32, seed=0)
    >>> tuple(seg.images.shape), tuple(seg.masks.shape), seg.masks.unique().tolist()
    ((8, 3, 32, 32), (8, 32, 32), [0, 1, 2, 3])
    >>> det = detection_set(4, size=64, seed=0)
    >>> tuple(det.boxes.shape), tuple(det.labels.shape)
    ((4, 3, 4), (4, 3))
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "SHAPES",
    "DetectionSet",
    "SegmentationSet",
    "detection_set",
    "segmentation_set",
    "unpad_boxes",
]

#: The shape classes, in label order (segmentation masks add 1: 0 is the background).
SHAPES = ("disc", "square", "triangle")


class SegmentationSet(NamedTuple):
    """Images ``(N, 3, H, W)`` in [0, 1] and class-index masks ``(N, H, W)`` (int64)."""

    images: Tensor
    masks: Tensor


class DetectionSet(NamedTuple):
    """Images ``(N, 3, H, W)``, boxes ``(N, M, 4)`` XYXY pixels, labels ``(N, M)`` (-1 pads)."""

    images: Tensor
    boxes: Tensor
    labels: Tensor


def _background(n: int, size: int, generator: torch.Generator) -> Tensor:
    """Smooth colour noise + oriented stripes + pixel noise, in [0, 1]."""
    coarse = torch.rand(n, 3, 4, 4, generator=generator)
    smooth = torch.nn.functional.interpolate(
        coarse, size=(size, size), mode="bicubic", align_corners=False
    )
    angle = torch.rand(n, 1, 1, 1, generator=generator) * math.pi
    freq = 0.3 + 0.9 * torch.rand(n, 1, 1, 1, generator=generator)
    grid = torch.arange(size, dtype=torch.float32)
    ys, xs = grid.view(1, 1, size, 1), grid.view(1, 1, 1, size)
    stripes = torch.sin(freq * (xs * torch.cos(angle) + ys * torch.sin(angle)))
    noise = torch.rand(n, 3, size, size, generator=generator)
    return (0.55 * smooth + 0.15 * stripes + 0.2 * noise + 0.1).clamp(0.0, 1.0)


def _shape_masks(kind: Tensor, cx: Tensor, cy: Tensor, r: Tensor, size: int) -> Tensor:
    """``(N, H, W)`` bool masks of shape ``kind`` (0 disc, 1 square, 2 triangle)."""
    grid = torch.arange(size, dtype=torch.float32) + 0.5  # pixel centres
    dx = grid.view(1, 1, size) - cx.view(-1, 1, 1)
    dy = grid.view(1, size, 1) - cy.view(-1, 1, 1)
    r = r.view(-1, 1, 1)
    disc = dx.square() + dy.square() <= r.square()
    square = (dx.abs() <= r * 0.85) & (dy.abs() <= r * 0.85)
    # Apex up, base at cy + r: the half-width grows linearly from the apex.
    triangle = (dy >= -r) & (dy <= r) & (dx.abs() <= (dy + r) * 0.55)
    kind = kind.view(-1, 1, 1)
    return torch.where(kind == 0, disc, torch.where(kind == 1, square, triangle))


def _colours(n: int, background: Tensor, generator: torch.Generator) -> Tensor:
    """A colour per image far enough from the image's mean background to be visible."""
    colour = torch.rand(n, 3, generator=generator)
    mean = background.mean(dim=(2, 3))
    # Push the colour away from the background mean: contrast of at least ~0.35 per image.
    direction = torch.where(colour >= mean, 1.0, -1.0)
    return (mean + direction * (0.35 + 0.4 * (colour - mean).abs())).clamp(0.0, 1.0)


def segmentation_set(
    n: int, size: int = 32, *, max_shapes: int = 3, seed: int = 0
) -> SegmentationSet:
    """``n`` images of 1 to ``max_shapes`` shapes, possibly overlapping, with their masks.

    Args:
        n: number of images.
        size: side in pixels.
        max_shapes: shapes per image are drawn uniformly in ``1 .. max_shapes``; later
            shapes cover earlier ones, in the image and in the mask alike.
        seed: the data's seed.

    Returns:
        A :class:`SegmentationSet`; mask value ``k > 0`` is ``SHAPES[k - 1]``.
    """
    generator = torch.Generator().manual_seed(seed)
    images = _background(n, size, generator)
    masks = torch.zeros(n, size, size, dtype=torch.int64)
    count = torch.randint(1, max_shapes + 1, (n,), generator=generator)
    for slot in range(max_shapes):
        kind = torch.randint(0, len(SHAPES), (n,), generator=generator)
        r = size * (0.12 + 0.14 * torch.rand(n, generator=generator))
        cx, cy = (r + (size - 2 * r) * torch.rand(n, generator=generator) for _ in range(2))
        drawn = _shape_masks(kind, cx, cy, r, size) & (slot < count).view(-1, 1, 1)
        colour = _colours(n, images, generator).view(n, 3, 1, 1)
        images = torch.where(drawn[:, None], colour, images)
        masks = torch.where(drawn, kind.view(-1, 1, 1) + 1, masks)
    noise = 0.04 * torch.randn(n, 3, size, size, generator=generator)
    return SegmentationSet((images + noise).clamp(0.0, 1.0), masks)


def _mask_boxes(masks: Tensor) -> Tensor:
    """XYXY boxes (x2, y2 exclusive) of ``(N, H, W)`` non-empty bool masks."""
    size = masks.shape[-1]
    index = torch.arange(size)
    cols, rows = masks.any(dim=1), masks.any(dim=2)  # (N, W), (N, H)

    def extent(hit: Tensor) -> tuple[Tensor, Tensor]:
        first = torch.where(hit, index, size).amin(dim=1)
        last = torch.where(hit, index, -1).amax(dim=1)
        return first, last + 1

    x1, x2 = extent(cols)
    y1, y2 = extent(rows)
    return torch.stack([x1, y1, x2, y2], dim=1).float()


def detection_set(n: int, size: int = 64, *, max_objects: int = 3, seed: int = 0) -> DetectionSet:
    """``n`` images of 1 to ``max_objects`` non-overlapping shapes with boxes and labels.

    Each object sits in its own cell of a 2x2 layout (jittered inside it), so no object
    hides another and every box is the tight box of the object's pixels.

    Args:
        n: number of images.
        size: side in pixels.
        max_objects: at most 4 (the layout's cells).
        seed: the data's seed.

    Returns:
        A :class:`DetectionSet`; slot ``j`` of image ``i`` is an object when
        ``labels[i, j] >= 0`` (objects first), else padding with a zero box.
    """
    if not 1 <= max_objects <= 4:
        raise ValueError(f"max_objects must be in 1..4 (one per 2x2 cell), got {max_objects}")
    generator = torch.Generator().manual_seed(seed)
    images = _background(n, size, generator)
    count = torch.randint(1, max_objects + 1, (n,), generator=generator)
    cells = torch.argsort(torch.rand(n, 4, generator=generator), dim=1)  # a cell per slot
    half = size / 2
    boxes = torch.zeros(n, max_objects, 4)
    labels = torch.full((n, max_objects), -1, dtype=torch.int64)
    for slot in range(max_objects):
        kind = torch.randint(0, len(SHAPES), (n,), generator=generator)
        r = half * (0.25 + 0.2 * torch.rand(n, generator=generator))
        row, col = cells[:, slot] // 2, cells[:, slot] % 2
        cx = col * half + r + (half - 2 * r) * torch.rand(n, generator=generator)
        cy = row * half + r + (half - 2 * r) * torch.rand(n, generator=generator)
        present = slot < count
        shape = _shape_masks(kind, cx, cy, r, size)
        colour = _colours(n, images, generator).view(n, 3, 1, 1)
        images = torch.where((shape & present.view(-1, 1, 1))[:, None], colour, images)
        boxes[:, slot] = torch.where(present[:, None], _mask_boxes(shape), 0.0)
        labels[:, slot] = torch.where(present, kind, -1)
    noise = 0.04 * torch.randn(n, 3, size, size, generator=generator)
    return DetectionSet((images + noise).clamp(0.0, 1.0), boxes, labels)


def unpad_boxes(boxes: Tensor, labels: Tensor) -> list[tuple[Tensor, Tensor]]:
    """Per image ``(boxes (K, 4), labels (K,))`` without the ``-1`` padding slots.

    Example:
        >>> import torch
        >>> out = unpad_boxes(torch.ones(1, 2, 4), torch.tensor([[2, -1]]))
        >>> out[0][0].shape, out[0][1].tolist()
        (torch.Size([1, 4]), [2])
    """
    return [(b[keep], lab[keep]) for b, lab, keep in zip(boxes, labels, labels >= 0, strict=True)]
