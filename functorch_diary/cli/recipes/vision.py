"""Segmentation and detection recipes: UNet, DeepLabv3 (two norms) and YOLO v1.

They train on the synthetic sets of :mod:`functorch_diary.data.synthetic` (shapes on
textured backgrounds, generated from the seed, nothing to download), or on a local
folder with ``--data-dir``. Each training batch goes through the pure keyed
augmentation of :mod:`functorch_diary.data.augment`, which moves masks and boxes with
the pixels. Sizes are chosen to reach a result in minutes on a CPU:

- ``unet``: 32x32 images, 4 classes (background + 3 shapes), UNet base width 16, depth 3.
- ``deeplab`` / ``deeplab-bn``: the same data; DeepLabv3 on a one-block-per-stage
  ResNet-10 (torchvision's ``BasicBlock``) with ASPP of width 32 at rates (1, 2, 3),
  GroupNorm(8) with weight-standardised convolutions (seed 004's variant) or BatchNorm.
  For 32x32 inputs the stem's max pool is skipped and the last stage is not strided
  (output stride 4, an 8x8 map), as DeepLab's dilation would do on large images; the
  keys stay torchvision's.
- ``yolo``: 64x64 images with 1-3 objects, YOLO v1 with widths / 16, a 4x4 grid
  (``total_stride=16``), 2 boxes per cell, hidden width 256; mAP@0.5 after
  confidence filtering and NMS.
"""

from __future__ import annotations

import csv
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.io import write_png
from torchvision.models.resnet import BasicBlock
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks, make_grid
from tqdm.auto import tqdm

from ... import checkpoint, prng
from ...data import augment, batches
from ...data.folders import load_segmentation_folder
from ...data.split import Split
from ...data.synthetic import SHAPES, detection_set, segmentation_set
from ...model.core import Model
from ...optim import GradientTransformation, adamw
from ...training.step import init_train_state, make_eval_step, make_train_step
from ...zoo import detection
from ...zoo.losses import yolo_v1_loss
from ...zoo.models import DeepLabV3, unet, yolo_v1

__all__ = [
    "SEGMENTATION_CLASSES",
    "VISION_TASKS",
    "VisionTask",
    "augment_detection",
    "augment_segmentation",
    "confusion_matrix",
    "detection_metrics",
    "load_detection_data",
    "load_segmentation_data",
    "mean_iou",
    "segmentation_metrics",
    "small_deeplab",
]

SEGMENTATION_CLASSES = ("background", *SHAPES)
SEG_SIZE, DET_SIZE = 32, 64
_YOLO = {"num_classes": len(SHAPES), "boxes": 2, "image_size": DET_SIZE}
_YOLO_GRID = DET_SIZE // 16


# ---------------------------------------------------------------------------- data


def load_segmentation_data(data_dir: Path | None, n_train: int = 2000, n_test: int = 500) -> Split:
    """The synthetic segmentation set (train seed 0, test seed 1), or ``data_dir/train``
    and ``data_dir/test`` folders of images + masks (see :mod:`~functorch_diary.data.folders`)."""
    if data_dir is not None:
        train, test = (load_segmentation_folder(data_dir / part) for part in ("train", "test"))
        return Split(*train, *test)
    train = segmentation_set(n_train, SEG_SIZE, seed=0)
    test = segmentation_set(n_test, SEG_SIZE, seed=1)
    return Split(train.images, train.masks, test.images, test.masks)


def _pack(boxes: Tensor, labels: Tensor) -> Tensor:
    """Boxes and labels as one ``(N, M, 5)`` target tensor, so batching indexes both."""
    return torch.cat([boxes, labels[..., None].to(boxes.dtype)], dim=-1)


def load_detection_data(data_dir: Path | None, n_train: int = 2000, n_test: int = 500) -> Split:
    """The synthetic detection set; targets are ``(N, M, 5)``: XYXY box and label (-1 pads)."""
    if data_dir is not None:
        raise FileNotFoundError(
            "the yolo recipe trains on its synthetic detection set only: drop --data-dir "
            "(functorch_diary.data.folders reads VOC/COCO boxes for your own loop)"
        )
    train = detection_set(n_train, DET_SIZE, seed=0)
    test = detection_set(n_test, DET_SIZE, seed=1)
    return Split(
        train.images, _pack(train.boxes, train.labels), test.images, _pack(test.boxes, test.labels)
    )


# ---------------------------------------------------------------------------- augmentation

_SEGMENTATION_PIPELINE = augment.compose(
    partial(augment.random_resized_crop, scale=(0.5, 1.0)),
    augment.random_horizontal_flip,
    augment.random_vertical_flip,
    partial(augment.random_rotation, degrees=20.0),
    partial(augment.random_color_jitter, brightness=0.3, contrast=0.3, saturation=0.3),
)
# Rotations would loosen the boxes and big crops cut objects: shifts, flips and colour.
_DETECTION_PIPELINE = augment.compose(
    partial(augment.random_pad_crop, padding=6),
    augment.random_horizontal_flip,
    augment.random_vertical_flip,
    partial(augment.random_color_jitter, brightness=0.3, contrast=0.3, saturation=0.3),
)


def augment_segmentation(images: Tensor, masks: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """Resized crop (50-100% of the area), flips, rotation (+-20 degrees) and colour jitter,
    the masks moved with the pixels."""
    out = _SEGMENTATION_PIPELINE(augment.VisionBatch(images, masks), key)
    return out.images, out.masks


def augment_detection(images: Tensor, targets: Tensor, key: Tensor) -> tuple[Tensor, Tensor]:
    """6-pixel shifts, flips and colour jitter; boxes moved (and clamped) with the pixels."""
    out = _DETECTION_PIPELINE(augment.VisionBatch(images, boxes=targets[..., :4]), key)
    return out.images, torch.cat([out.boxes, targets[..., 4:]], dim=-1)


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
    """``(C, C)`` counts: row = true class, column = predicted class."""
    index = target.reshape(-1) * num_classes + predicted.reshape(-1)
    return torch.bincount(index, minlength=num_classes**2).reshape(num_classes, num_classes)


def mean_iou(confusion: Tensor) -> tuple[float, list[float]]:
    """Mean over classes of ``TP / (TP + FP + FN)`` (classes absent from both sides skipped)."""
    tp = confusion.diag().double()
    union = confusion.sum(0).double() + confusion.sum(1).double() - tp
    ious = [float(t / u) for t, u in zip(tp, union, strict=True) if u > 0]
    per_class = [float(t / u) if u > 0 else math.nan for t, u in zip(tp, union, strict=True)]
    return sum(ious) / len(ious), per_class


def _batched_outputs(predict: Callable[[Tensor], Tensor], x: Tensor, batch_size: int = 250):
    return torch.cat([predict(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])


def segmentation_metrics(predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> dict:
    """``{"miou": ..., "pixel_accuracy": ..., "iou_<class>": ...}`` on ``(x, y)``."""
    predicted = _batched_outputs(lambda b: predict(b).argmax(dim=1), x)
    confusion = confusion_matrix(predicted, y, len(SEGMENTATION_CLASSES))
    miou, per_class = mean_iou(confusion)
    metrics = {"miou": miou, "pixel_accuracy": float(confusion.diag().sum() / confusion.sum())}
    metrics.update({f"iou_{n}": v for n, v in zip(SEGMENTATION_CLASSES, per_class, strict=True)})
    return metrics


def _detections(outputs: Tensor, score_threshold: float = 0.01) -> list[detection.Detections]:
    # mAP ranks every detection, so it is computed from a low threshold (as VOC's
    # evaluation does); the pictures show only the confident ones.
    decoded = detection.decode_yolo_v1(outputs, _YOLO["num_classes"], _YOLO["boxes"], DET_SIZE)
    return detection.postprocess(*decoded, score_threshold=score_threshold, iou_threshold=0.4)


def detection_metrics(predict: Callable[[Tensor], Tensor], x: Tensor, y: Tensor) -> dict:
    """``{"map50": ..., "ap50_<class>": ...}`` on ``(x, y)``."""
    found = _detections(_batched_outputs(predict, x))
    targets = [(t[t[:, 4] >= 0, :4], t[t[:, 4] >= 0, 4].long()) for t in y]
    mean, per_class = detection.mean_average_precision(found, targets, len(SHAPES))
    metrics = {"map50": mean}
    metrics.update({f"ap50_{n}": v for n, v in zip(SHAPES, per_class, strict=True)})
    return metrics


# ---------------------------------------------------------------------------- pictures


def _as_uint8(images: Tensor) -> Tensor:
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


_COLOURS = ["#e6194b", "#3cb44b", "#4363d8"]


def draw_segmentation(images: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
    """A uint8 grid: each image with the true mask overlaid, then with the prediction."""
    predicted = outputs.argmax(dim=1)
    tiles = []
    for image, mask in ((i, m) for i, m in zip(images, targets, strict=True)):
        tiles.append(_overlay(image, mask))
    for image, mask in zip(images, predicted, strict=True):
        tiles.append(_overlay(image, mask))
    return make_grid(torch.stack(tiles), nrow=len(images), padding=2)


def _overlay(image: Tensor, mask: Tensor) -> Tensor:
    classes = torch.stack([mask == k for k in range(1, len(SEGMENTATION_CLASSES))])
    return draw_segmentation_masks(_as_uint8(image), classes, alpha=0.5, colors=_COLOURS)


def draw_detection(images: Tensor, outputs: Tensor, targets: Tensor) -> Tensor:
    """A uint8 grid: true boxes (white) and predicted boxes with class and score."""
    tiles = []
    for image, found, target in zip(images, _detections(outputs, 0.3), targets, strict=True):
        picture = _as_uint8(image)
        truth = target[target[:, 4] >= 0, :4]
        picture = draw_bounding_boxes(picture, truth, colors="white", width=1)
        labels = [
            f"{SHAPES[k][0]} {s:.2f}" for k, s in zip(found.labels, found.scores, strict=True)
        ]
        colours = [_COLOURS[int(k)] for k in found.labels]
        picture = draw_bounding_boxes(picture, found.boxes, labels, colors=colours, width=1)
        tiles.append(picture)
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


@dataclass(frozen=True)
class VisionTask:
    """A segmentation or detection recipe: what the training loop needs beyond a classifier.

    Attributes:
        name, description: for the command line.
        build_model: ``() -> Model``.
        load_data: ``(data_dir or None) -> Split`` (targets: masks or packed boxes).
        make_optimizer: ``(lr, total_steps) -> GradientTransformation``.
        loss_fn: ``(outputs, targets) -> scalar``.
        augment: ``(images, targets, key) -> (images, targets)``.
        evaluate: ``(predict, x, y) -> metrics``; ``predict`` maps images to outputs.
        metric: the headline entry of ``evaluate``'s dict.
        draw: ``(images, outputs, targets) -> uint8 picture``.
        epochs, batch_size, lr: defaults.
    """

    name: str
    description: str
    build_model: Callable[[], Model]
    load_data: Callable[[Path | None], Split]
    make_optimizer: Callable[[float, int], GradientTransformation]
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    augment: Callable[[Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
    evaluate: Callable[[Callable[[Tensor], Tensor], Tensor, Tensor], dict]
    metric: str
    draw: Callable[[Tensor, Tensor, Tensor], Tensor]
    epochs: int
    batch_size: int
    lr: float


def _deeplab(num_groups: int | None, weight_std: bool) -> Model:
    return Model(partial(small_deeplab, len(SEGMENTATION_CLASSES), num_groups, weight_std))


VISION_TASKS = {
    task.name: task
    for task in (
        VisionTask(
            name="unet",
            description="UNet (base 16, depth 3) on 32x32 synthetic shapes, AdamW, cosine; mIoU",
            build_model=partial(unet, 3, len(SEGMENTATION_CLASSES), 16, 3),
            load_data=load_segmentation_data,
            make_optimizer=partial(_adamw_cosine, 1e-4),
            loss_fn=F.cross_entropy,
            augment=augment_segmentation,
            evaluate=segmentation_metrics,
            metric="miou",
            draw=draw_segmentation,
            epochs=8,
            batch_size=32,
            lr=3e-3,
        ),
        VisionTask(
            name="deeplab",
            description="DeepLabv3 (ResNet-10, GroupNorm + weight standardisation) on 32x32 "
            "synthetic shapes, AdamW, cosine; mIoU",
            build_model=partial(_deeplab, 8, True),
            load_data=load_segmentation_data,
            make_optimizer=partial(_adamw_cosine, 1e-4),
            loss_fn=F.cross_entropy,
            augment=augment_segmentation,
            evaluate=segmentation_metrics,
            metric="miou",
            draw=draw_segmentation,
            epochs=8,
            batch_size=32,
            lr=2e-3,
        ),
        VisionTask(
            name="deeplab-bn",
            description="DeepLabv3 (ResNet-10, BatchNorm) on 32x32 synthetic shapes, AdamW, "
            "cosine; mIoU",
            build_model=partial(_deeplab, None, False),
            load_data=load_segmentation_data,
            make_optimizer=partial(_adamw_cosine, 1e-4),
            loss_fn=F.cross_entropy,
            augment=augment_segmentation,
            evaluate=segmentation_metrics,
            metric="miou",
            draw=draw_segmentation,
            epochs=8,
            batch_size=32,
            lr=2e-3,
        ),
        VisionTask(
            name="yolo",
            description="YOLO v1 (widths / 16, 4x4 grid) on 64x64 synthetic shapes, AdamW, "
            "cosine; mAP@0.5",
            build_model=partial(
                yolo_v1, **_YOLO, width_divisor=16, hidden=256, dropout=0.0, total_stride=16
            ),
            load_data=load_detection_data,
            make_optimizer=partial(_adamw_cosine, 1e-4),
            loss_fn=yolo_loss,
            augment=augment_detection,
            evaluate=detection_metrics,
            metric="map50",
            draw=draw_detection,
            epochs=12,
            batch_size=32,
            lr=1e-3,
        ),
    )
}


# ---------------------------------------------------------------------------- the loop


class EpochRecord(NamedTuple):
    epoch: int
    train_loss: float
    metrics: dict
    seconds: float
    cpu_seconds: float


def train_task(
    task: VisionTask,
    *,
    data_dir: Path | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float | None = None,
    seed: int = 0,
    device: str = "cpu",
    compile: bool | None = None,
    out: Path | None = None,
    limit: int | None = None,
    progress: bool = True,
) -> list[EpochRecord]:
    """Train ``task``: pure steps over augmented batches, the test metrics after each epoch.

    Args:
        task: the recipe.
        data_dir: passed to ``task.load_data``.
        epochs, batch_size, lr: override the task's defaults (``None`` keeps them).
        seed: init, batch order and augmentation keys.
        device, compile: where and how the step runs (``make_train_step``'s policy).
        out: write ``metrics.csv``, ``loss.png``, ``predictions.png`` and
            ``checkpoint.fdc`` (the final ``TrainState``) here.
        limit: use only the first ``limit`` training and test images (quick runs).
        progress: a tqdm bar over the steps.

    Returns:
        One :class:`EpochRecord` per epoch.
    """
    epochs = task.epochs if epochs is None else epochs
    batch_size = task.batch_size if batch_size is None else batch_size
    lr = task.lr if lr is None else lr
    split = task.load_data(data_dir)
    x_train, y_train, x_test, y_test = (
        t[:limit].to(device) if limit else t.to(device) for t in split
    )
    if len(x_train) < batch_size:
        raise ValueError(
            f"--batch-size {batch_size} is larger than the {len(x_train)} training images"
        )
    model = task.build_model()
    steps_per_epoch = len(x_train) // batch_size
    optimizer = task.make_optimizer(lr, epochs * steps_per_epoch)
    ts = init_train_state(model, optimizer, seed, device=device)
    step = make_train_step(model, task.loss_fn, optimizer, compile=compile)
    eval_step = make_eval_step(model, compile=compile)

    def predict(images: Tensor) -> Tensor:
        return eval_step(ts, (images, None))[0]

    aug_key = prng.key(seed + 1, device=device)
    history: list[EpochRecord] = []
    wall, cpu = time.perf_counter(), time.process_time()
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, unit="step")
    for epoch in range(epochs):
        losses = []
        for xb, yb in batches(x_train, y_train, batch_size, seed=seed, epoch=epoch):
            xb, yb = task.augment(xb, yb, prng.fold_in(aug_key, ts.step))
            ts, metrics = step(ts, (xb, yb))
            losses.append(metrics["loss"])
            bar.update(1)
        metrics = task.evaluate(predict, x_test, y_test)
        history.append(
            EpochRecord(
                epoch + 1,
                float(torch.stack(losses).mean()),
                metrics,
                time.perf_counter() - wall,
                time.process_time() - cpu,
            )
        )
        bar.set_postfix(
            loss=f"{history[-1].train_loss:.4f}", **{task.metric: f"{metrics[task.metric]:.4f}"}
        )
    bar.close()
    if out is not None:
        _write_outputs(out, task, history, ts, x_test[:8].cpu(), y_test[:8].cpu(), predict)
    return history


def _write_outputs(out, task, history, ts, images, targets, predict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    names = sorted(history[-1].metrics)
    with open(out / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "train_loss", *names, "seconds", "cpu_seconds"])
        for record in history:
            writer.writerow(
                [record.epoch, record.train_loss, *(record.metrics[n] for n in names),
                 record.seconds, record.cpu_seconds]
            )  # fmt: skip
    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [r.epoch for r in history]
    ax.plot(epochs, [r.train_loss for r in history], label="train loss")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    twin = ax.twinx()
    twin.plot(epochs, [r.metrics[task.metric] for r in history], color="C1", label=task.metric)
    twin.set_ylabel(f"test {task.metric}")
    fig.legend(loc="upper center")
    fig.tight_layout()
    fig.savefig(out / "loss.png", dpi=100)
    plt.close(fig)
    write_png(
        task.draw(images, predict(images.to(ts.step.device)).cpu(), targets),
        str(out / "predictions.png"),
    )
    checkpoint.save(
        out / "checkpoint.fdc",
        ts,
        metadata={
            "recipe": task.name,
            "epochs": len(history),
            task.metric: history[-1].metrics[task.metric],
        },
    )
