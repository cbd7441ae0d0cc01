"""Segmentation and detection recipes: UNet, DeepLabv3+ (two norms) and YOLO v1.

They train on the synthetic sets of :mod:`functorch_diary.data.synthetic` (shapes on
textured backgrounds, generated from the seed, nothing to download); ``unet`` and the
``deeplab`` recipes read ``--data-dir/train`` and ``--data-dir/test`` image + mask
folders instead when given. Augmentation is :mod:`functorch_diary.data.augment`'s, pure
and keyed, drawn afresh for every training batch from the step's key
(``Recipe.augment(images, targets, key)``): geometric transforms move the masks or boxes
with the pixels (boxes pushed out of the image are dropped, as torchvision's
``SanitizeBoundingBoxes`` does, and become padding slots), then colour jitter changes
the pixels only.

Sizes are chosen to reach a result in minutes on one CPU core:

- ``unet``: 32x32 images, 4 classes (background + 3 shapes), UNet base width 16, depth 3.
- ``deeplab`` / ``deeplab-bn``: the same data; DeepLabv3+ (:class:`SmallDeepLab`): a
  one-block-per-stage ResNet-10 (torchvision's ``BasicBlock``) with ASPP of width 32 at
  rates (1, 2, 3), with GroupNorm(8) and weight-standardised convolutions (the DeepLabv3
  tutorial's variant) or BatchNorm. For 32x32 inputs the stem's max pool is skipped and
  the last stage is not strided (output stride 8, a 4x4 map), as DeepLab's dilation
  does on large images, and a DeepLabv3+ decoder joins the first stage's 16x16 features;
  the backbone's and ASPP's keys stay torchvision's and DeepLabV3's.
- ``yolo``: 64x64 images with 1-3 objects, one per quadrant; YOLO v1 with widths / 8,
  a 2x2 grid (``total_stride=32``: one cell per quadrant, so no two objects share a
  cell), 2 boxes per cell, and a head of two 1x1 convolutions (hidden width 256) shared
  by the cells (:class:`ConvHeadYolo`: the paper's fully connected head, which learns
  every cell's mapping separately, was at test mAP 0.096 after the same 30 epochs, this
  one at 0.865); mAP@0.5 after confidence filtering and NMS.

:func:`draw_segmentation` and :func:`draw_detection` make the prediction pictures
(masks overlaid with ``draw_segmentation_masks``, boxes with ``draw_bounding_boxes``)
that ``train --out`` writes as ``predictions.png``.
"""

from __future__ import annotations

import math
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.resnet import BasicBlock
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid

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
from ...zoo.models import DeepLabV3, WSConv2d, YoloV1, unet
from .base import Recipe

__all__ = [
    "RECIPES",
    "SEGMENTATION_CLASSES",
    "ConvHeadYolo",
    "SmallDeepLab",
    "augment_detection",
    "augment_segmentation",
    "confusion_matrix",
    "conv_head_yolo",
    "detection_metrics",
    "draw_detection",
    "draw_segmentation",
    "load_detection_data",
    "load_segmentation_data",
    "mean_iou",
    "pack_targets",
    "segmentation_metrics",
    "small_deeplab",
    "yolo_loss",
]

SEGMENTATION_CLASSES = ("background", *SHAPES)
SEG_SIZE, DET_SIZE = 32, 64
_YOLO = {"num_classes": len(SHAPES), "boxes": 2, "image_size": DET_SIZE}
_YOLO_STRIDE = 32  # a 2x2 grid on 64x64 images: one cell per quadrant of the layout
_YOLO_GRID = DET_SIZE // _YOLO_STRIDE


# ---------------------------------------------------------------------------- data

_JITTER = partial(augment.random_color_jitter, brightness=0.3, contrast=0.3, saturation=0.3)
# The test images are neither zoomed nor rotated: half the training images stay so.
_SEGMENTATION_AUGMENT = augment.compose(
    augment.random_apply(
        augment.compose(
            partial(augment.random_resized_crop, scale=(0.5, 1.0)),
            partial(augment.random_rotation, degrees=20.0),
        )
    ),
    augment.random_horizontal_flip,
    augment.random_vertical_flip,
    _JITTER,
)
# Rotations would loosen the boxes and big crops cut objects: shifts and flips.
_DETECTION_AUGMENT = augment.compose(
    partial(augment.random_pad_crop, padding=6),
    augment.random_horizontal_flip,
    augment.random_vertical_flip,
    _JITTER,
)


def augment_segmentation(images: Tensor, masks: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """A training batch's augmentation: on half the images a resized crop (50-100% of
    the area) and a rotation (+-20 degrees), then flips, the masks moved with the pixels,
    then colour jitter (brightness, contrast, saturation +-30%); a pure function of its
    arguments.

    Example:
        >>> from functorch_diary import prng
        >>> images, masks = segmentation_set(4, 32, seed=0)
        >>> out = augment_segmentation(images, masks, prng.key(0))
        >>> torch.equal(out[1], augment_segmentation(images, masks, prng.key(0))[1])
        True
    """
    out = _SEGMENTATION_AUGMENT(augment.VisionBatch(images, masks), key)
    return out.images, out.masks


def augment_detection(images: Tensor, targets: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """A training batch's augmentation: 6-pixel shifts and flips, the packed ``(N, M, 5)``
    boxes moved and clamped with the pixels (a box left with a side under a pixel is
    dropped to a padding slot, :func:`~functorch_diary.data.augment.sanitize_boxes`),
    then colour jitter (+-30%).

    Example:
        >>> from functorch_diary import prng
        >>> data = detection_set(4, 64, seed=0)
        >>> images, targets = augment_detection(data.images, pack_targets(data.boxes, data.labels),
        ...                                     prng.key(0))
        >>> images.shape, targets.shape
        (torch.Size([4, 3, 64, 64]), torch.Size([4, 3, 5]))
    """
    out = _DETECTION_AUGMENT(augment.VisionBatch(images, boxes=targets[..., :4]), key)
    boxes, labels = augment.sanitize_boxes(out.boxes, targets[..., 4].long(), images.shape[-2:])
    return out.images, pack_targets(boxes, labels)


def load_segmentation_data(data_dir: Path | None, n_train: int = 4000, n_test: int = 500) -> Split:
    """The synthetic segmentation set (train seed 0, test seed 1), or ``data_dir/train``
    and ``data_dir/test`` folders of images + masks (:mod:`~functorch_diary.data.folders`)."""
    if data_dir is not None:
        train, test = (load_segmentation_folder(data_dir / part) for part in ("train", "test"))
    else:
        train = segmentation_set(n_train, SEG_SIZE, seed=0)
        test = segmentation_set(n_test, SEG_SIZE, seed=1)
    return Split(*train, *test)


def pack_targets(boxes: Tensor, labels: Tensor) -> Tensor:
    """Boxes ``(N, M, 4)`` and labels ``(N, M)`` as one ``(N, M, 5)`` target tensor, so
    batching indexes both (the detection recipe's targets; label -1 marks padding).

    Example:
        >>> pack_targets(torch.tensor([[[1.0, 2.0, 3.0, 4.0]]]), torch.tensor([[2]])).tolist()
        [[[1.0, 2.0, 3.0, 4.0, 2.0]]]
    """
    return torch.cat([boxes, labels[..., None].to(boxes.dtype)], dim=-1)


def load_detection_data(data_dir: Path | None, n_train: int = 4000, n_test: int = 500) -> Split:
    """The synthetic detection set (train seed 0, test seed 1); targets are ``(N, M, 5)``:
    an XYXY box and its label (-1 for padding)."""
    if data_dir is not None:
        raise FileNotFoundError(
            "the yolo recipe trains on its synthetic detection set only: drop --data-dir "
            "(functorch_diary.data.folders reads VOC/COCO boxes for your own loop)"
        )
    train = detection_set(n_train, DET_SIZE, seed=0)
    test = detection_set(n_test, DET_SIZE, seed=1)
    return Split(train.images, pack_targets(train.boxes, train.labels), test.images,
                 pack_targets(test.boxes, test.labels))  # fmt: skip


# ---------------------------------------------------------------------------- models


class SmallDeepLab(DeepLabV3):
    """DeepLabv3+ on ResNet-10 (one ``BasicBlock`` per stage) for 32x32 images.

    The DeepLabv3 backbone and ASPP are :class:`~functorch_diary.zoo.models.DeepLabV3`'s
    (no stem max pool and an unstrided last stage: output stride 8, a 4x4 map). A 4x4 map
    upsampled bilinearly cannot draw a 10-pixel shape: even the true masks average-pooled
    to 4x4 and upsampled score mIoU 0.60, and to 8x8 0.83. So, as in DeepLabv3+ (Chen et
    al. 2018), the ASPP features are upsampled to the first stage's 16x16 map, joined
    with its features reduced to ``low_channels`` by a 1x1 convolution, fused by a 3x3
    convolution, and classified by ASPP's own classifier before the final upsampling.

    Example:
        >>> model = Model(partial(SmallDeepLab, 4, 8, True))
        >>> params, state = model.init(seed=0)
        >>> model.apply(params, state, torch.rand(2, 3, 32, 32))[0].shape
        torch.Size([2, 4, 32, 32])
    """

    def __init__(
        self,
        num_classes: int,
        num_groups: int | None,
        weight_std: bool,
        aspp_channels: int = 32,
        low_channels: int = 16,
    ):
        super().__init__(
            BasicBlock,
            (1, 1, 1, 1),
            num_classes,
            num_groups=num_groups,
            weight_std=weight_std,
            dilate_last=False,
            aspp_channels=aspp_channels,
            aspp_rates=(1, 2, 3),
        )
        self.maxpool = torch.nn.Identity()
        self.layer4[0].conv1.stride = (1, 1)
        self.layer4[0].downsample[0].stride = (1, 1)
        conv = WSConv2d if weight_std else torch.nn.Conv2d
        norm = (
            torch.nn.BatchNorm2d if num_groups is None else partial(torch.nn.GroupNorm, num_groups)
        )
        self.reduce = torch.nn.Sequential(
            conv(64, low_channels, 1, bias=False), norm(low_channels), torch.nn.ReLU()
        )
        self.decoder = torch.nn.Sequential(
            conv(aspp_channels + low_channels, aspp_channels, 3, padding=1, bias=False),
            norm(aspp_channels),
            torch.nn.ReLU(),
        )
        for m in (*self.reduce, *self.decoder):
            if isinstance(m, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: Tensor) -> Tensor:
        low = self.layer1(self.maxpool(self.relu(self.bn1(self.conv1(x)))))
        deep = self.aspp.features(self.layer4(self.layer3(self.layer2(low))))
        deep = F.interpolate(deep, size=low.shape[2:], mode="bilinear", align_corners=True)
        logits = self.aspp.conv3(self.decoder(torch.cat([deep, self.reduce(low)], dim=1)))
        return F.interpolate(logits, size=x.shape[2:], mode="bilinear", align_corners=True)


def small_deeplab(num_classes: int, num_groups: int | None, weight_std: bool) -> SmallDeepLab:
    """The recipes' :class:`SmallDeepLab`: ASPP width 32 at rates (1, 2, 3), decoder
    joining 16 low-level channels."""
    return SmallDeepLab(num_classes, num_groups, weight_std)


class ConvHeadYolo(YoloV1):
    """YOLO v1 whose fully connected head is two 1x1 convolutions over the grid.

    The backbone is :class:`~functorch_diary.zoo.models.YoloV1`'s; the head maps each
    cell's feature vector to ``hidden`` features and then to that cell's ``C + 5B``
    numbers, the same weights for every cell (the fully connected head learns each
    cell's mapping separately). The output layout is YOLO v1's ``(N, S, S, C + 5B)``.

    Example:
        >>> model = conv_head_yolo(num_classes=3, image_size=64, width_divisor=16, hidden=8,
        ...                        total_stride=32)
        >>> params, state = model.init(seed=0)
        >>> model.apply(params, state, torch.rand(2, 3, 64, 64))[0].shape
        torch.Size([2, 2, 2, 13])
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        channels, hidden = self.head[1].in_features // self.grid**2, self.head[1].out_features
        self.head = torch.nn.Sequential(
            torch.nn.Conv2d(channels, hidden, 1),
            torch.nn.LeakyReLU(0.1),
            torch.nn.Dropout(self.head[3].p),
            torch.nn.Conv2d(hidden, self.per_cell, 1),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.backbone(x)).permute(0, 2, 3, 1)


def conv_head_yolo(**kwargs) -> Model:
    """Functional :class:`ConvHeadYolo` (the arguments are :class:`YoloV1`'s)."""
    return Model(partial(ConvHeadYolo, **kwargs))


# ---------------------------------------------------------------------------- losses


_LAMBDA_COORD, _LAMBDA_NOOBJ = 5.0, 0.5
_CONFIDENCE_TARGET = "iou"


def yolo_loss(outputs: Tensor, targets: Tensor) -> Tensor:
    """YOLO v1's loss against the augmented boxes, encoded on the grid here."""
    grid = encode_targets(targets)
    return yolo_v1_loss(
        outputs,
        grid,
        num_classes=_YOLO["num_classes"],
        boxes=_YOLO["boxes"],
        lambda_coord=_LAMBDA_COORD,
        lambda_noobj=_LAMBDA_NOOBJ,
        confidence_target=_CONFIDENCE_TARGET,
    )


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
# Tiles are enlarged (nearest) to about this side before drawing, so masks, 1-pixel box
# outlines and the labels' text stay legible on 32x32 and 64x64 images.
_TILE = 128


def _as_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def _enlarge(t: Tensor, scale: int) -> Tensor:
    return t.repeat_interleave(scale, dim=-2).repeat_interleave(scale, dim=-1)


def _overlay(image: Tensor, mask: Tensor, scale: int) -> Tensor:
    mask = _enlarge(mask, scale)
    classes = torch.stack([mask == k for k in range(1, len(SEGMENTATION_CLASSES))])
    picture = _as_uint8(_enlarge(image, scale))
    return draw_segmentation_masks(picture, classes, alpha=0.5, colors=_COLOURS)


def _boxes_picture(
    image: Tensor, found: detection.Detections, target: Tensor, scale: int
) -> Tensor:
    picture, truth = _as_uint8(_enlarge(image, scale)), target[target[:, 4] >= 0, :4] * scale
    # draw_bounding_boxes warns on an empty set: an image with no object, or no detection.
    if len(truth):
        picture = draw_bounding_boxes(picture, truth, colors="white", width=1)
    if len(found.boxes):
        labels = [
            f"{SHAPES[int(k)][0]} {float(p):.2f}" for k, p in zip(*found[2:0:-1], strict=True)
        ]
        colours = [_COLOURS[int(k)] for k in found.labels]
        picture = draw_bounding_boxes(picture, found.boxes * scale, labels, colors=colours, width=1)
    return picture


def _predict(model: Model, ts: TrainState, images: Tensor) -> Tensor:
    outputs, _ = model.apply(ts.params, ts.state, images, train=False)
    return outputs.cpu()


def _scale(images: Tensor) -> int:
    return max(1, _TILE // max(images.shape[-2:]))


def draw_segmentation(model: Model, ts: TrainState, images: Tensor, masks: Tensor) -> Tensor:
    """A uint8 ``(3, H', W')`` grid: one row of ``images`` with the true masks overlaid,
    one with the masks ``model`` predicts from ``ts``; each tile enlarged to about 128
    pixels (a 32x32 image to 128x128), 2 pixels apart.

    ``images`` are on the state's device; the picture is on the CPU.

    Example:
        >>> from functorch_diary import init_train_state, optim
        >>> model = RECIPES["unet"].build_model()
        >>> ts = init_train_state(model, optim.sgd(0.1), seed=0)
        >>> data = segmentation_set(2, SEG_SIZE, seed=0)
        >>> draw_segmentation(model, ts, data.images, data.masks).shape  # 2 rows of 2 tiles
        torch.Size([3, 262, 262])
    """
    predicted = _predict(model, ts, images).argmax(dim=1)
    images, masks, scale = images.cpu(), masks.cpu(), _scale(images)
    truth = [_overlay(i, m, scale) for i, m in zip(images, masks, strict=True)]
    guessed = [_overlay(i, m, scale) for i, m in zip(images, predicted, strict=True)]
    return make_grid(torch.stack(truth + guessed), nrow=len(images), padding=2)


def draw_detection(model: Model, ts: TrainState, images: Tensor, targets: Tensor) -> Tensor:
    """A uint8 ``(3, H', W')`` row of ``images``: true boxes in white, YOLO v1's predicted
    boxes (score above 0.3, after NMS) in their class colour with class initial and
    score; each tile enlarged to about 128 pixels, 2 pixels apart.

    ``images`` are on the state's device; the picture is on the CPU.

    Example:
        >>> from functorch_diary import init_train_state, optim
        >>> model = RECIPES["yolo"].build_model()
        >>> ts = init_train_state(model, optim.sgd(0.1), seed=0)
        >>> data = detection_set(2, DET_SIZE, seed=0)
        >>> targets = pack_targets(data.boxes, data.labels)
        >>> draw_detection(model, ts, data.images, targets).dtype
        torch.uint8
    """
    found = _detections(_predict(model, ts, images), score_threshold=0.3)
    scale = _scale(images)
    tiles = [
        _boxes_picture(image, dets, target, scale)
        for image, dets, target in zip(images.cpu(), found, targets.cpu(), strict=True)
    ]
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
    "augment": augment_segmentation,
    "evaluate": segmentation_metrics,
    "draw": draw_segmentation,
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
            description="DeepLabv3+ (ResNet-10, GroupNorm + weight standardisation) on 32x32 "
            "synthetic shapes, AdamW + cosine; mIoU",
            build_model=partial(_deeplab, 8, True),
            epochs=14,
            lr=5e-3,
            **_SEGMENTATION,
        ),
        Recipe(
            name="deeplab-bn",
            description="DeepLabv3+ (ResNet-10, BatchNorm) on 32x32 synthetic shapes, AdamW + "
            "cosine; mIoU",
            build_model=partial(_deeplab, None, False),
            epochs=14,
            lr=5e-3,
            **_SEGMENTATION,
        ),
        Recipe(
            name="yolo",
            description="YOLO v1 (widths / 8, 2x2 grid, 1x1-convolution head) on 64x64 "
            "synthetic shapes, AdamW + cosine; mAP@0.5",
            build_model=partial(
                conv_head_yolo,
                **_YOLO,
                width_divisor=8,
                hidden=256,
                dropout=0.0,
                total_stride=_YOLO_STRIDE,
            ),
            load_data=load_detection_data,
            make_optimizer=partial(_adamw_cosine, 1e-4),
            epochs=30,
            batch_size=16,
            lr=4e-3,
            augment=augment_detection,
            loss_fn=yolo_loss,
            evaluate=detection_metrics,
            draw=draw_detection,
            monitor="map50",
        ),
    )
}
