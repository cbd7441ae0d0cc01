"""From detector outputs to boxes and a score: decoding, NMS and mAP@0.5.

- :func:`encode_yolo_v1` / :func:`decode_yolo_v1`: YOLO v1's grid tensor (the layout of
  :func:`~functorch_diary.zoo.losses.yolo_v1_loss`) to and from XYXY pixel boxes.
- :func:`decode_darknet`: the detections a YOLOv3 cfg model returns (centre, size in
  pixels, objectness, class scores per row) to the same ``(boxes, scores, labels)``.
- :func:`postprocess`: confidence filtering and per-class non-maximum suppression
  (``torchvision.ops.batched_nms``), per image.
- :func:`mean_average_precision`: PASCAL VOC's metric (VOC2010+ all-point interpolated
  average precision per class, at one IoU threshold), averaged over the classes that
  have ground truth.

Boxes are torchvision's XYXY format throughout; a class-specific score is the box's
confidence times its class probability, as in the YOLO papers.

Example:
    >>> import torch
    >>> from functorch_diary.zoo import detection
    >>> boxes, labels = torch.tensor([[[8.0, 32.0, 24.0, 64.0]]]), torch.tensor([[1]])
    >>> target = detection.encode_yolo_v1(boxes, labels, grid=2, num_classes=2, image_size=64)
    >>> found = detection.postprocess(*detection.decode_yolo_v1(target, 2, 1, 64))
    >>> found[0].boxes.tolist(), found[0].labels.tolist()
    ([[8.0, 32.0, 24.0, 64.0]], [1])
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from einops import rearrange
from torch import Tensor
from torchvision.ops import batched_nms, box_convert, box_iou, clip_boxes_to_image

__all__ = [
    "Detections",
    "average_precision",
    "decode_darknet",
    "decode_yolo_v1",
    "encode_yolo_v1",
    "mean_average_precision",
    "postprocess",
]


class Detections(NamedTuple):
    """One image's detections: boxes ``(K, 4)`` XYXY, scores ``(K,)``, labels ``(K,)``."""

    boxes: Tensor
    scores: Tensor
    labels: Tensor


def encode_yolo_v1(
    boxes: Tensor, labels: Tensor, *, grid: int, num_classes: int, image_size: int
) -> Tensor:
    """YOLO v1 targets ``(N, S, S, C + 5)`` from padded XYXY boxes ``(N, M, 4)``.

    Each object goes to the cell holding its centre: one-hot class, centre within the
    cell, width and height relative to the image, ``has_object = 1``. Slots with label
    ``-1`` are padding. When two objects share a cell the later slot wins (YOLO v1 can
    predict one class per cell).

    Example:
        >>> t = encode_yolo_v1(torch.tensor([[[0.0, 0.0, 32.0, 32.0]]]), torch.tensor([[0]]),
        ...                    grid=2, num_classes=1, image_size=64)
        >>> t[0, 0, 0].tolist()
        [1.0, 0.5, 0.5, 0.5, 0.5, 1.0]
    """
    n = boxes.shape[0]
    target = boxes.new_zeros(n, grid, grid, num_classes + 5)
    centre = (boxes[..., :2] + boxes[..., 2:]) / 2 / image_size * grid  # grid units
    size = (boxes[..., 2:] - boxes[..., :2]) / image_size
    cell = centre.floor().long().clamp(0, grid - 1)
    for slot in range(boxes.shape[1]):
        present = labels[:, slot] >= 0
        rows, cols = cell[:, slot, 1], cell[:, slot, 0]
        values = torch.cat(
            [
                torch.nn.functional.one_hot(labels[:, slot].clamp(min=0), num_classes).to(boxes),
                centre[:, slot] - cell[:, slot],
                size[:, slot],
                torch.ones(n, 1, dtype=boxes.dtype, device=boxes.device),
            ],
            dim=1,
        )
        index = torch.arange(n, device=boxes.device)
        current = target[index, rows, cols]
        target = target.index_put(
            (index, rows, cols), torch.where(present[:, None], values, current)
        )
    return target


def decode_yolo_v1(
    predictions: Tensor, num_classes: int, boxes: int, image_size: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Every predicted box of a YOLO v1 output, in pixels, with its class-specific score.

    Args:
        predictions: ``(N, S, S, C + 5B)`` (or flat) raw outputs, laid out as in
            :func:`~functorch_diary.zoo.losses.yolo_v1_loss`.
        num_classes, boxes: C and B.
        image_size: input side in pixels.

    Returns:
        ``(boxes (N, S*S*B, 4), scores (N, S*S*B), labels (N, S*S*B))``: XYXY clipped to
        the image; score = confidence x the cell's best class probability.
    """
    n = predictions.shape[0]
    per_cell = num_classes + 5 * boxes
    s = round((predictions.numel() / (n * per_cell)) ** 0.5)
    pred = predictions.reshape(n, s, s, per_cell)
    class_prob, label = pred[..., :num_classes].max(dim=-1)  # (N, S, S)
    b = rearrange(pred[..., num_classes:], "n h w (b k) -> n h w b k", b=boxes)
    rows = torch.arange(s, dtype=pred.dtype, device=pred.device).view(1, s, 1, 1)
    cols = torch.arange(s, dtype=pred.dtype, device=pred.device).view(1, 1, s, 1)
    cx = (cols + b[..., 0]) / s * image_size
    cy = (rows + b[..., 1]) / s * image_size
    w, h = b[..., 2] * image_size, b[..., 3] * image_size
    xyxy = box_convert(torch.stack([cx, cy, w, h], dim=-1), "cxcywh", "xyxy")
    xyxy = clip_boxes_to_image(xyxy, (image_size, image_size))
    scores = b[..., 4] * class_prob[..., None]
    labels = label[..., None].expand_as(scores)
    flat = "n h w b -> n (h w b)"
    return (
        rearrange(xyxy, "n h w b k -> n (h w b) k"),
        rearrange(scores, flat),
        rearrange(labels, flat),
    )


def decode_darknet(
    detections: Tensor, image_size: int | tuple[int, int]
) -> tuple[Tensor, Tensor, Tensor]:
    """The rows of a YOLOv3 cfg model's output as ``(boxes, scores, labels)``.

    Args:
        detections: ``(N, K, 5 + C)``, what :class:`~functorch_diary.zoo.models.Darknet`
            returns: centre and size in input pixels, objectness and class scores.
        image_size: the input's side, or ``(height, width)``, to clip the boxes to.

    Returns:
        ``(boxes (N, K, 4), scores (N, K), labels (N, K))``; score = objectness x best
        class score.
    """
    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    boxes = clip_boxes_to_image(box_convert(detections[..., :4], "cxcywh", "xyxy"), size)
    class_score, labels = detections[..., 5:].max(dim=-1)
    return boxes, detections[..., 4] * class_score, labels


def postprocess(
    boxes: Tensor,
    scores: Tensor,
    labels: Tensor,
    *,
    score_threshold: float = 0.2,
    iou_threshold: float = 0.5,
    max_detections: int = 100,
) -> list[Detections]:
    """Per image: keep scores above ``score_threshold``, then per-class NMS, best first.

    Args:
        boxes, scores, labels: ``(N, K, 4)``, ``(N, K)``, ``(N, K)`` from a decoder.
        score_threshold: minimum class-specific score.
        iou_threshold: NMS drops a box overlapping a better one of its class by more.
        max_detections: at most this many per image.

    Returns:
        One :class:`Detections` per image, sorted by decreasing score.
    """
    out = []
    for b, s, lab in zip(boxes, scores, labels, strict=True):
        keep = s > score_threshold
        b, s, lab = b[keep], s[keep], lab[keep]
        kept = batched_nms(b.float(), s.float(), lab, iou_threshold)[:max_detections]
        out.append(Detections(b[kept], s[kept], lab[kept]))
    return out


def average_precision(recall: Tensor, precision: Tensor) -> float:
    """Area under the precision envelope (VOC2010+: every recall point, no 11-point grid).

    Args:
        recall, precision: cumulative values over detections sorted by decreasing score.

    Example:
        >>> precision = torch.tensor([1.0, 0.5, 2 / 3], dtype=torch.float64)
        >>> average_precision(torch.tensor([0.5, 0.5, 1.0]), precision)  # 1/2 * 1 + 1/2 * 2/3
        0.8333333333333333
    """
    r = torch.cat([torch.zeros(1), recall.double(), torch.ones(1)])
    p = torch.cat([torch.zeros(1), precision.double(), torch.zeros(1)])
    envelope = p.flip(0).cummax(0).values.flip(0)  # best precision at any recall >= r
    return float(((r[1:] - r[:-1]) * envelope[1:]).sum())


def mean_average_precision(
    detections: Sequence[Detections],
    targets: Sequence[tuple[Tensor, Tensor]],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> tuple[float, list[float | None]]:
    """mAP at ``iou_threshold`` over a dataset (PASCAL VOC's metric, without "difficult").

    Detections of a class, from all images, are taken by decreasing score; each is a true
    positive when it overlaps a not-yet-matched ground-truth box of its class in its
    image by at least ``iou_threshold`` (the best-overlapping one), else a false positive.

    Args:
        detections: per image, e.g. from :func:`postprocess`.
        targets: per image ``(boxes (G, 4), labels (G,))``.
        num_classes: classes ``0 .. num_classes - 1``.
        iou_threshold: 0.5 for mAP@0.5.

    Returns:
        ``(mAP, per-class AP)``; a class with no ground-truth box gets ``None`` and is
        left out of the mean (mAP is 0.0 when no class has any).
    """
    if len(detections) != len(targets):
        raise ValueError(f"{len(detections)} images of detections but {len(targets)} of targets")
    per_class: list[float | None] = []
    for c in range(num_classes):
        gt = [b[lab == c] for b, lab in targets]
        total = sum(len(g) for g in gt)
        if total == 0:
            per_class.append(None)
            continue
        found = [
            (float(score), image, box)
            for image, d in enumerate(detections)
            for box, score in zip(d.boxes[d.labels == c], d.scores[d.labels == c], strict=True)
        ]
        found.sort(key=lambda item: -item[0])
        matched = [torch.zeros(len(g), dtype=torch.bool) for g in gt]
        hits = []
        for _, image, box in found:
            hit = False
            if len(gt[image]):
                iou = box_iou(box[None].float(), gt[image].float())[0]
                iou = iou.masked_fill(matched[image], -1.0)
                best = int(iou.argmax())
                if float(iou[best]) >= iou_threshold:
                    matched[image][best], hit = True, True
            hits.append(hit)
        tp = torch.tensor(hits, dtype=torch.float64).cumsum(0)
        precision = tp / torch.arange(1, len(hits) + 1, dtype=torch.float64)
        per_class.append(average_precision(tp / total, precision) if hits else 0.0)
    present = [ap for ap in per_class if ap is not None]
    return (sum(present) / len(present) if present else 0.0), per_class
