"""Segmentation and detection recipes: UNet, DeepLabv3 (two norms) and YOLO v1.

They train on the synthetic sets of :mod:`functorch_diary.data.synthetic` (shapes on
textured backgrounds, generated from the seed, nothing to download); ``unet`` and the
``deeplab`` recipes read ``--data-dir/train`` and ``--data-dir/test`` image + mask
folders instead when given. Augmentation is :mod:`functorch_diary.data.augment`'s, pure
and keyed:

- geometric transforms move the pixels together with the masks or boxes. The ``train``
  loop augments images only (``Recipe.augment`` sees no targets), so these are drawn
  once when the data is built: the training split is the generated images followed by
  one augmented copy of each, drawn from a fixed key (the data does not depend on
  ``--seed``, as the generated images do not);
- photometric ones (colour jitter) change no target, and run on every batch.

Sizes are chosen to reach a result in minutes on one CPU core:

- ``unet``: 32x32 images, 4 classes (background + 3 shapes), UNet base width 16, depth 3.
- ``deeplab`` / ``deeplab-bn``: the same data; DeepLabv3 on a one-block-per-stage
  ResNet-10 (torchvision's ``BasicBlock``) with ASPP of width 32 at rates (1, 2, 3), with
  GroupNorm(8) and weight-standardised convolutions (the DeepLabv3 tutorial's variant) or BatchNorm.
  For 32x32 inputs the stem's max pool is skipped and the last stage is not strided
  (output stride 4, an 8x8 map), as DeepLab's dilation does on large images; the keys
  stay torchvision's.
- ``yolo``: 64x64 images with 1-3 objects, one per quadrant; YOLO v1 with widths / 8,
  a 2x2 grid (``total_stride=32``: one cell per quadrant, so no two objects share a
  cell), 2 boxes per cell, hidden width 256; mAP@0.5 after confidence filtering and NMS.
  (A 4x4 grid at widths / 16 stayed at mAP 0.04 after 3 epochs: the fully connected
  head must learn every cell's mapping separately, 4 times as many as with 2x2.)

:func:`draw_predictions` makes the prediction pictures (masks overlaid with
``draw_segmentation_masks``, boxes with ``draw_bounding_boxes``).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import Tensor
from torchvision.models.resnet import BasicBlock
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

from ... import prng
from ...data import augment, batches
from ...data.folders import load_segmentation_folder
from ...data.split import Split
from ...data.synthetic import SHAPES, detection_set, segmentation_set
from ...model.core import Model
from ...optim import GradientTransformation, adamw
from ...training.evaluation import EvalStep
from ...training.step import TrainState
from ...zoo import detection
from ...zoo.losses import yolo_v1_loss
from ...zoo.models import DeepLabV3, unet, yolo_v1
from .base import Recipe

__all__ = [
    "RECIPES",
    "SEGMENTATION_CLASSES",
    "augment_detection",
    "augment_segmentation",
    "confusion_matrix",
    "detection_metrics",
    "draw_predictions",
    "load_detection_data",
    "load_segmentation_data",
    "mean_iou",
    "segmentation_metrics",
    "small_deeplab",
    "yolo_loss",
]

SEGMENTATION_CLASSES = ("background", *SHAPES)
SEG_SIZE, DET_SIZE = 32, 64
_YOLO = {"num_classes": len(SHAPES), "boxes": 2, "image_size": DET_SIZE}
_YOLO_STRIDE = 32  # a 2x2 grid on 64x64 images: one cell per quadrant of the layout
_YOLO_GRID = DET_SIZE // _YOLO_STRIDE
_DATA_KEY = 20_251_201  # the key of the drawn-once geometric augmentation


# ---------------------------------------------------------------------------- data

_SEGMENTATION_GEOMETRY = augment.compose(
    partial(augment.random_resized_crop, scale=(0.5, 1.0)),
    augment.random_horizontal_flip,
    augment.random_vertical_flip,
    partial(augment.random_rotation, degrees=20.0),
)
# Rotations would loosen the boxes and big crops cut objects: shifts and flips.
_DETECTION_GEOMETRY = augment.compose(
    partial(augment.random_pad_crop, padding=6),
    augment.random_horizontal_flip,
    augment.random_vertical_flip,
)


def augment_segmentation(images: Tensor, masks: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Resized crop (50-100% of the area), flips and rotation (+-20 degrees), the masks
    moved with the pixels; a pure function of its arguments."""
    out = _SEGMENTATION_GEOMETRY(augment.VisionBatch(images, masks), key)
    return out.images, out.masks


def augment_detection(images: Tensor, targets: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """6-pixel shifts and flips; the packed boxes (``(N, M, 5)``) moved and clamped with the
    pixels, labels kept."""
    out = _DETECTION_GEOMETRY(augment.VisionBatch(images, boxes=targets[..., :4]), key)
    return out.images, torch.cat([out.boxes, targets[..., 4:]], dim=-1)


def _with_augmented_copy(x: Tensor, y: Tensor, augment_fn: Callable) -> tuple[Tensor, Tensor]:
    ax, ay = augment_fn(x, y, prng.key(_DATA_KEY))
    return torch.cat([x, ax]), torch.cat([y, ay])


def load_segmentation_data(data_dir: Path | None, n_train: int = 2000, n_test: int = 500) -> Split:
    """The synthetic segmentation set (train seed 0, test seed 1), or ``data_dir/train``
    and ``data_dir/test`` folders of images + masks (:mod:`~functorch_diary.data.folders`);
    the training images are followed by one augmented copy of each."""
    if data_dir is not None:
        train, test = (load_segmentation_folder(data_dir / part) for part in ("train", "test"))
    else:
        train = segmentation_set(n_train, SEG_SIZE, seed=0)
        test = segmentation_set(n_test, SEG_SIZE, seed=1)
    return Split(*_with_augmented_copy(*train, augment_segmentation), *test)


def _pack(boxes: Tensor, labels: Tensor) -> Tensor:
    """Boxes and labels as one ``(N, M, 5)`` target tensor, so batching indexes both."""
    return torch.cat([boxes, labels[..., None].to(boxes.dtype)], dim=-1)


def load_detection_data(data_dir: Path | None, n_train: int = 2000, n_test: int = 500) -> Split:
    """The synthetic detection set, training images followed by an augmented copy of each;
    targets are ``(N, M, 5)``: an XYXY box and its label (-1 for padding)."""
    if data_dir is not None:
        raise FileNotFoundError(
            "the yolo recipe trains on its synthetic detection set only: drop --data-dir "
            "(functorch_diary.data.folders reads VOC/COCO boxes for your own loop)"
        )
    train = detection_set(n_train, DET_SIZE, seed=0)
    test = detection_set(n_test, DET_SIZE, seed=1)
    x, y = _with_augmented_copy(train.images, _pack(train.boxes, train.labels), augment_detection)
    return Split(x, y, test.images, _pack(test.boxes, test.labels))


def photometric(images: Tensor, key: Tensor) -> Tensor:
    """Per-batch colour jitter (brightness, contrast, saturation +-30%): no target moves."""
    jitter = partial(augment.random_color_jitter, brightness=0.3, contrast=0.3, saturation=0.3)
    return jitter(augment.VisionBatch(images), key).images


# ---------------------------------------------------------------------------- models


def small_deeplab(num_classes: int, num_groups: int | None, weight_std: bool) -> DeepLabV3:
    """DeepLabv3 on ResNet-10 (one ``BasicBlock`` per stage) for 32x32 images: no stem max
    pool and an unstrided last stage give output stride 4."""
    net = DeepLabV3(
        BasicBlock,
        (1, 1, 1, 1),
        num_classes,
        num_groups=num_groups,
        weight_std=weight_std,
        dilate_last=False,
        aspp_channels=32,
        aspp_rates=(1, 2, 3),
    )
    net.maxpool = torch.nn.Identity()
    net.layer4[0].conv1.stride = (1, 1)
    net.layer4[0].downsample[0].stride = (1, 1)
    return net


# ---------------------------------------------------------------------------- losses


def yolo_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """YOLO v1's loss against the augmented boxes, encoded on the grid here."""
    grid = encode_targets(targets)
    return yolo_v1_loss(outputs, grid, num_classes=_YOLO["num_classes"], boxes=_YOLO["boxes"])


def encode_targets(targets: Tensor) -> Tensor:
    boxes, labels = targets[..., :4], targets[..., 4].long()
    # A box the crop shrank to a sliver is no longer an object.
    size = boxes[..., 2:] - boxes[..., :2]
    labels = torch.where((size >= 2).all(dim=-1), labels, -1)
    return detection.encode_yolo_v1(
        boxes, labels, grid=_YOLO_GRID, num_classes=_YOLO["num_classes"], image_size=DET_SIZE
    )


# ---------------------------------------------------------------------------- metrics


def confusion_matrix(predicted: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """``(C, C)`` pixel counts: row = true class, column = predicted class."""
    index = target.reshape(-1) * num_classes + predicted.reshape(-1)
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> tuple[float, list[float]]:
    """Mean over classes of ``TP / (TP + FP + FN)``; a class absent from both the truth
    and the prediction is NaN in the list and left out of the mean.

    Example:
        >>> mean_iou(torch.tensor([[3, 1], [0, 2]]))  # IoUs 3/4 and 2/3
        (0.7083333333333333, [0.75, 0.6666666666666666])
    """
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    per_class = [float(t / u) if u > 0 else math.nan for t, u in zip(tp, union, strict=True)]
    present = [v for v in per_class if not math.isnan(v)]
    return sum(present) / len(present), per_class


def _outputs(eval_step: EvalStep, ts: TrainState, x: Tensor, y: Tensor, batch_size: int = 250):
    """Every output of the split, and the loss averaged over its examples."""
    outputs, loss = [], 0.0
    for xb, yb in batches(x, y, batch_size, shuffle=False, drop_last=False):
        out, metrics = eval_step(ts, (xb, yb))
        outputs.append(out)
        loss += float(metrics["loss"]) * len(xb) if "loss" in metrics else 0.0
    return torch.cat(outputs), loss / len(x)


def segmentation_metrics(eval_step: EvalStep, ts: TrainState, x: Tensor, y: Tensor) -> dict:
    """``{"loss", "miou", "pixel_accuracy", "iou_<class>"...}`` of a split."""
    outputs, loss = _outputs(eval_step, ts, x, y)
    confusion = confusion_matrix(outputs.argmax(dim=1), y, len(SEGMENTATION_CLASSES))
    miou, per_class = mean_iou(confusion)
    metrics = {"loss": loss, "miou": miou,
               "pixel_accuracy": float(confusion.diag().sum() / confusion.sum())}  # fmt: skip
    metrics.update({f"iou_{n}": v for n, v in zip(SEGMENTATION_CLASSES, per_class, strict=True)})
    return metrics


def _detections(outputs: Tensor, score_threshold: float = 0.01) -> list[detection.Detections]:
    # mAP ranks every detection, so it is computed from a low threshold (as VOC's
    # evaluation does); the pictures show only the confident ones.
    decoded = detection.decode_yolo_v1(outputs, _YOLO["num_classes"], _YOLO["boxes"], DET_SIZE)
    return detection.postprocess(*decoded, score_threshold=score_threshold, iou_threshold=0.4)


def detection_metrics(eval_step: EvalStep, ts: TrainState, x: Tensor, y: Tensor) -> dict:
    """``{"loss", "map50", "ap50_<class>"...}`` of a split (packed ``(N, M, 5)`` targets)."""
    outputs, loss = _outputs(eval_step, ts, x, y)
    targets = [(t[t[:, 4] >= 0, :4], t[t[:, 4] >= 0, 4].long()) for t in y]
    mean, per_class = detection.mean_average_precision(_detections(outputs), targets, len(SHAPES))
    metrics = {"loss": loss, "map50": mean}
    metrics.update({f"ap50_{n}": v for n, v in zip(SHAPES, per_class, strict=True)})
    return metrics


# ---------------------------------------------------------------------------- pictures

_COLOURS = ["#e6194b", "#3cb44b", "#4363d8"]  # disc, square, triangle


def _as_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _overlay(image: Tensor, mask: Tensor) -> Tensor:
    classes = torch.stack([mask == k for k in range(1, len(SEGMENTATION_CLASSES))])
    return draw_segmentation_masks(_as_uint8(image), classes, alpha=0.5, colors=_COLOURS)


def _boxes_picture(image: Tensor, found: detection.Detections, target: Tensor) -> Tensor:
    picture = draw_bounding_boxes(
        _as_uint8(image), target[target[:, 4] >= 0, :4], colors="white", width=1
    )
    labels = [f"{SHAPES[int(k)][0]} {float(p):.2f}" for k, p in zip(*found[2:0:-1], strict=True)]
    colours = [_COLOURS[int(k)] for k in found.labels]
    return draw_bounding_boxes(picture, found.boxes, labels, colors=colours, width=1)


def draw_predictions(recipe: str, ts: TrainState, images: Tensor, targets: Tensor) -> Tensor:
    """A uint8 ``(3, H, W)`` picture of a trained recipe's predictions on ``images``.

    Segmentation: one row with the true masks overlaid, one with the predicted masks.
    Detection: true boxes in white, predicted boxes (score above 0.3, after NMS) in
    their class colour with class initial and score.
    """
    model = RECIPES[recipe].build_model()
    outputs, _ = model.apply(ts.params, ts.state, images, train=False)
    if recipe == "yolo":
        found = _detections(outputs, score_threshold=0.3)
        tiles = [_boxes_picture(*item) for item in zip(images, found, targets, strict=True)]
    else:
        truth = [_overlay(i, m) for i, m in zip(images, targets, strict=True)]
        predicted = [_overlay(i, m) for i, m in zip(images, outputs.argmax(dim=1), strict=True)]
        tiles = truth + predicted
    return make_grid(torch.stack(tiles), nrow=len(images), padding=2)


# ---------------------------------------------------------------------------- recipes


def _adamw_cosine(weight_decay: float, lr: float, total_steps: int) -> GradientTransformation:
    # Short linear warm-up, then cosine to zero: the same schedule for every vision recipe.
    warmup = max(1, total_steps // 20)

    def schedule(count: Tensor) -> Tensor:
        step = count.to(torch.float64)
        ramp = (step + 1) / warmup
        progress = ((step - warmup) / max(total_steps - warmup, 1)).clamp(0, 1)
        return lr * torch.minimum(ramp, 0.5 * (1 + torch.cos(math.pi * progress)))

    return adamw(schedule, weight_decay=weight_decay)


def _deeplab(num_groups: int | None, weight_std: bool) -> Model:
    return Model(partial(small_deeplab, len(SEGMENTATION_CLASSES), num_groups, weight_std))


_SEGMENTATION = {
    "load_data": load_segmentation_data,
    "make_optimizer": partial(_adamw_cosine, 1e-4),
    "augment": photometric,
    "evaluate": segmentation_metrics,
    "monitor": "miou",
    "batch_size": 32,
}

RECIPES = {
    recipe.name: recipe
    for recipe in (
        Recipe(
            name="unet",
            description="UNet (base 16, depth 3) on 32x32 synthetic shapes, AdamW + cosine; mIoU",
            build_model=partial(unet, 3, len(SEGMENTATION_CLASSES), 16, 3),
            epochs=14,
            lr=1e-2,
            **_SEGMENTATION,
        ),
        Recipe(
            name="deeplab",
            description="DeepLabv3 (ResNet-10, GroupNorm + weight standardisation) on 32x32 "
            "synthetic shapes, AdamW + cosine; mIoU",
            build_model=partial(_deeplab, 8, True),
            epochs=8,
            lr=5e-3,
            **_SEGMENTATION,
        ),
        Recipe(
            name="deeplab-bn",
            description="DeepLabv3 (ResNet-10, BatchNorm) on 32x32 synthetic shapes, AdamW + "
            "cosine; mIoU",
            build_model=partial(_deeplab, None, False),
            epochs=8,
            lr=5e-3,
            **_SEGMENTATION,
        ),
        Recipe(
            name="yolo",
            description="YOLO v1 (widths / 8, 2x2 grid) on 64x64 synthetic shapes, AdamW + "
            "cosine; mAP@0.5",
            build_model=partial(
                yolo_v1,
                **_YOLO,
                width_divisor=8,
                hidden=256,
                dropout=0.0,
                total_stride=_YOLO_STRIDE,
            ),
            load_data=load_detection_data,
            make_optimizer=partial(_adamw_cosine, 1e-4),
            epochs=25,
            batch_size=32,
            lr=2e-3,
            augment=photometric,
            loss_fn=yolo_loss,
            evaluate=detection_metrics,
            monitor="map50",
        ),
    )
}
