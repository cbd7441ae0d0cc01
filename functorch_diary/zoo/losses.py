"""Losses the detection and segmentation models train with, as pure functions.

- :func:`segmentation_cross_entropy`: ``nn.CrossEntropyLoss`` for (N, C, H, W) logits
  and (N, H, W) class-index targets, with an error that explains the common mistake
  of one-hot (N, C, H, W) targets ("expected target of 3 dimensions, got 4").
- :func:`yolo_v1_loss`: the sum-squared YOLO v1 loss (Redmon et al. 2016, eq. 3),
  vectorised over cells and boxes (no Python loop over the grid).

Example:
    >>> import torch
    >>> from functorch_diary.zoo.losses import segmentation_cross_entropy
    >>> logits, labels = torch.randn(2, 4, 8, 8), torch.randint(0, 4, (2, 8, 8))
    >>> loss = segmentation_cross_entropy(logits, labels)
    >>> torch.allclose(loss, torch.nn.CrossEntropyLoss()(logits, labels))
    True
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["box_iou_cxcywh", "segmentation_cross_entropy", "yolo_v1_loss"]


def segmentation_cross_entropy(
    logits: Tensor,
    targets: Tensor,
    *,
    weight: Tensor | None = None,
    ignore_index: int = -100,
    reduction: str = "mean",
) -> Tensor:
    """Per-pixel cross entropy: ``nn.CrossEntropyLoss`` with the shapes checked first.

    Args:
        logits: (N, C, H, W) unnormalised scores (the softmax is inside the loss).
        targets: (N, H, W) integer class indices in ``[0, C)`` (or ``ignore_index``).
        weight: optional (C,) class weights.
        ignore_index: a target value that contributes nothing.
        reduction: ``"mean"``, ``"sum"`` or ``"none"``.

    Returns:
        The loss, as ``torch.nn.functional.cross_entropy`` computes it.

    Raises:
        ValueError: the shapes or the target dtype are wrong; a one-hot (N, C, H, W)
            target is recognised and the message says to take ``argmax(dim=1)``.

    Example:
        >>> import torch
        >>> labels = torch.zeros(2, 8, 8, dtype=torch.long)
        >>> one_hot = torch.nn.functional.one_hot(labels, 4).permute(0, 3, 1, 2)
        >>> segmentation_cross_entropy(torch.randn(2, 4, 8, 8), one_hot)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: targets look one-hot encoded: shape (2, 4, 8, 8) equals the logits' shape; ...
    """
    if logits.dim() != 4:
        raise ValueError(f"logits must be (N, C, H, W), got shape {tuple(logits.shape)}")
    n, c, h, w = logits.shape
    if targets.dim() == 4 and tuple(targets.shape) == (n, c, h, w):
        raise ValueError(
            f"targets look one-hot encoded: shape {tuple(targets.shape)} equals the logits' "
            f"shape; CrossEntropyLoss wants the (N, H, W) map of class indices in [0, {c - 1}]: "
            "pass targets.argmax(dim=1) or the label map itself"
        )
    if tuple(targets.shape) != (n, h, w):
        raise ValueError(
            f"targets must be (N, H, W) = {(n, h, w)} for logits {tuple(logits.shape)}, "
            f"got {tuple(targets.shape)}"
        )
    if targets.is_floating_point() or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must hold integer class indices, got dtype {targets.dtype}; "
            "convert with targets.long()"
        )
    return F.cross_entropy(
        logits, targets.long(), weight=weight, ignore_index=ignore_index, reduction=reduction
    )


def box_iou_cxcywh(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """Intersection over union of boxes given as (..., 4) ``(cx, cy, w, h)``, elementwise.

    Example:
        >>> import torch
        >>> box_iou_cxcywh(torch.tensor([0.5, 0.5, 1.0, 1.0]), torch.tensor([0.5, 0.5, 0.5, 1.0]))
        tensor(0.5000)
    """
    a_lo, a_hi = a[..., :2] - a[..., 2:4] / 2, a[..., :2] + a[..., 2:4] / 2
    b_lo, b_hi = b[..., :2] - b[..., 2:4] / 2, b[..., :2] + b[..., 2:4] / 2
    sides = (torch.minimum(a_hi, b_hi) - torch.maximum(a_lo, b_lo)).clamp(min=0)
    inter = sides[..., 0] * sides[..., 1]
    area_a = (a[..., 2] * a[..., 3]).abs()
    area_b = (b[..., 2] * b[..., 3]).abs()
    return inter / (area_a + area_b - inter + eps)


def yolo_v1_loss(
    predictions: Tensor,
    targets: Tensor,
    *,
    num_classes: int,
    boxes: int = 2,
    grid: int | None = None,
    lambda_coord: float = 5.0,
    lambda_noobj: float = 0.5,
    confidence_target: Literal["iou", "one"] = "iou",
) -> Tensor:
    """The YOLO v1 loss, summed over the grid and averaged over the batch.

    Layout of one cell (the paper's S x S x (B * 5 + C) tensor, classes first):
    ``[p_1 .. p_C, x_1, y_1, w_1, h_1, c_1, ..., x_B, y_B, w_B, h_B, c_B]``; ``x, y`` are
    the box centre within its cell and ``w, h`` the size relative to the image, all in
    [0, 1]. A target cell is ``[one-hot class (C), x, y, w, h, has_object]``.

    In a cell with an object, the predicted box with the highest IoU with the target is
    "responsible": it gets the coordinate loss (square roots of ``w, h``, so errors on
    small boxes weigh more) and the confidence target IoU (detached, as in the paper).
    Every other box gets ``lambda_noobj * c**2``. Cells with an object add the class
    probabilities' squared error. IoUs compare boxes in cell units: centre plus the
    cell offset, size times the grid.

    Args:
        predictions: (N, S, S, B * 5 + C) or (N, S * S * (B * 5 + C)) raw network output.
        targets: (N, S, S, C + 5).
        num_classes: C.
        boxes: B.
        grid: S; inferred from ``targets`` when ``None``.
        lambda_coord, lambda_noobj: the paper's weights (5 and 0.5).
        confidence_target: what the responsible box's confidence regresses to: its IoU
            with the target (``"iou"``, the paper) or 1 (``"one"``, as many
            reimplementations do: objects and background separate faster while the
            predicted boxes are still poor).

    Returns:
        A 0-dim tensor: the total loss divided by N.

    Example:
        >>> import torch
        >>> pred, target = torch.rand(2, 7, 7, 30), torch.zeros(2, 7, 7, 25)
        >>> float(yolo_v1_loss(torch.zeros(2, 7, 7, 30), target, num_classes=20))
        0.0
        >>> yolo_v1_loss(pred, target, num_classes=20).shape
        torch.Size([])
    """
    if confidence_target not in ("iou", "one"):
        raise ValueError(f'confidence_target must be "iou" or "one", got {confidence_target!r}')
    iou_target = confidence_target == "iou"
    s = targets.shape[1] if grid is None else grid
    c, per_cell = num_classes, num_classes + 5 * boxes
    n = targets.shape[0]
    if tuple(targets.shape) != (n, s, s, c + 5):
        raise ValueError(
            f"targets must be (N, S, S, C + 5) = {(n, s, s, c + 5)}, got {tuple(targets.shape)}"
        )
    if predictions.numel() != n * s * s * per_cell:
        raise ValueError(
            f"predictions must hold N * S * S * (C + 5B) = {n} * {s} * {s} * {per_cell} values, "
            f"got shape {tuple(predictions.shape)}"
        )
    pred = predictions.reshape(n, s, s, per_cell)
    pred_boxes = pred[..., c:].reshape(n, s, s, boxes, 5)
    obj = targets[..., c + 4]  # (N, S, S): 1 where a cell holds an object
    true_box = targets[..., c : c + 4]

    # Cell offsets turn in-cell centres into grid coordinates, so IoU sees real overlap.
    rows, cols = torch.meshgrid(
        torch.arange(s, dtype=pred.dtype, device=pred.device),
        torch.arange(s, dtype=pred.dtype, device=pred.device),
        indexing="ij",
    )
    offset = torch.stack([cols, rows], dim=-1)  # x goes along columns

    def to_grid(box: Tensor, offset: Tensor) -> Tensor:
        return torch.cat([box[..., :2] + offset, box[..., 2:4] * s], dim=-1)

    ious = box_iou_cxcywh(
        to_grid(pred_boxes[..., :4], offset[:, :, None, :]),
        to_grid(true_box, offset)[..., None, :],
    ).detach()  # (N, S, S, B)
    best = ious.argmax(dim=-1, keepdim=True)
    responsible = torch.zeros_like(ious).scatter(-1, best, 1.0) * obj[..., None]

    def signed_sqrt(t: Tensor) -> Tensor:
        # A raw prediction can be negative; sqrt's sign-preserving form keeps a gradient.
        return torch.sign(t) * torch.sqrt(t.abs() + 1e-9)

    xy_err = (pred_boxes[..., :2] - true_box[..., None, :2]).square().sum(-1)
    wh_err = (
        (signed_sqrt(pred_boxes[..., 2:4]) - torch.sqrt(true_box[..., None, 2:4])).square().sum(-1)
    )
    conf = pred_boxes[..., 4]
    coord_loss = lambda_coord * (responsible * (xy_err + wh_err)).sum()
    obj_loss = (responsible * (conf - (ious if iou_target else 1.0)).square()).sum()
    noobj_loss = lambda_noobj * ((1.0 - responsible) * conf.square()).sum()
    class_loss = (obj * (pred[..., :c] - targets[..., :c]).square().sum(-1)).sum()
    return (coord_loss + obj_loss + noobj_loss + class_loss) / n
