"""Local segmentation and detection data: an images + masks folder, VOC and COCO boxes.

Everything is read from files already on disk (never downloaded), with errors that name
the missing file or folder and say what layout is expected.

- :func:`load_segmentation_folder`: ``root/images/NAME.(png|jpg)`` with
  ``root/masks/NAME.png``, a single-channel PNG of class indices (gray values, or a
  palette PNG's indices as in VOC's ``SegmentationClass``).
- :func:`load_voc_detection`: the PASCAL VOC layout (``Annotations/*.xml``,
  ``JPEGImages/*.jpg``, ``ImageSets/Main/<split>.txt``), read directly with the standard
  XML parser (torchvision's ``VOCDetection`` needs the ``VOCdevkit/VOC2012`` nesting and
  returns raw dicts).
- :func:`load_coco_detection`: a COCO ``instances_*.json`` and its image folder.

Boxes come back in torchvision's XYXY pixel format as float32 ``(K, 4)`` tensors, labels
as int64 ``(K,)``. VOC's 1-based inclusive corners become ``(xmin - 1, ymin - 1, xmax,
ymax)``; COCO's ``[x, y, w, h]`` become ``(x, y, x + w, y + h)``.

Example:
    >>> from functorch_diary.data.folders import load_segmentation_folder
    >>> load_segmentation_folder("/nonexistent")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    FileNotFoundError: segmentation folder /nonexistent: no images/ folder ...
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from .images import read_image, read_mask

__all__ = [
    "VOC_CLASSES",
    "Detection",
    "load_coco_detection",
    "load_segmentation_folder",
    "load_voc_detection",
]

#: PASCAL VOC's 20 classes in their usual label order.
VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa",
    "train", "tvmonitor",
)  # fmt: skip
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


class Detection(NamedTuple):
    """One annotated image: uint8 ``(3, H, W)``, boxes ``(K, 4)`` XYXY, labels ``(K,)``."""

    image: Tensor
    boxes: Tensor
    labels: Tensor


def _folder(path: Path, what: str, root: Path, layout: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what} {root}: no {path.name}/ folder (expected {layout})")
    return path


def load_segmentation_folder(
    root: str | Path, images: str = "images", masks: str = "masks"
) -> tuple[Tensor, Tensor]:
    """Every image of ``root/images`` with its mask ``root/masks/<same stem>.png``.

    Args:
        root: the dataset folder.
        images, masks: the two sub-folder names.

    Returns:
        ``(images, masks)``: float32 ``(N, 3, H, W)`` in [0, 1] and int64 ``(N, H, W)``;
        the files are sorted by name, and all must have one size.

    Raises:
        FileNotFoundError: a missing folder, no images, or an image without its mask
            (named).
        ValueError: an unreadable file, or sizes that differ (both files named).
    """
    root = Path(root)
    layout = f"{images}/NAME.png|jpg and {masks}/NAME.png"
    image_dir = _folder(root / images, "segmentation folder", root, layout)
    mask_dir = _folder(root / masks, "segmentation folder", root, layout)
    files = sorted(p for p in image_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"segmentation folder {root}: no .png/.jpg files in {image_dir}")
    xs, ys = [], []
    for file in files:
        mask_file = mask_dir / f"{file.stem}.png"
        if not mask_file.is_file():
            raise FileNotFoundError(f"mask {mask_file} for image {file} not found")
        image, mask = read_image(file), read_mask(mask_file)
        if image.shape[1:] != mask.shape or (xs and image.shape != xs[0].shape):
            raise ValueError(
                f"{file} is {tuple(image.shape[1:])} and {mask_file} {tuple(mask.shape)}; "
                f"every image and mask must be {tuple((xs or [image])[0].shape[1:])}"
            )
        xs.append(image)
        ys.append(mask)
    return torch.stack(xs).float() / 255.0, torch.stack(ys).long()


def _voc_objects(xml_file: Path, classes: tuple[str, ...]) -> tuple[Tensor, Tensor]:
    try:
        tree = ET.parse(xml_file)
    except ET.ParseError as error:
        raise ValueError(f"{xml_file} is not valid XML: {error}") from None
    boxes, labels = [], []
    for obj in tree.getroot().iter("object"):
        name = (obj.findtext("name") or "").strip()
        if name not in classes:
            raise ValueError(f"{xml_file}: object class {name!r} is not one of {classes}")
        box = obj.find("bndbox")
        try:
            xmin, ymin, xmax, ymax = (
                float(box.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax")
            )
        except (AttributeError, TypeError, ValueError):
            raise ValueError(
                f"{xml_file}: object {name!r} needs a <bndbox> with numeric xmin, ymin, xmax, ymax"
            ) from None
        boxes.append([xmin - 1.0, ymin - 1.0, xmax, ymax])
        labels.append(classes.index(name))
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4), torch.tensor(
        labels, dtype=torch.int64
    )


def load_voc_detection(
    root: str | Path, split: str = "train", classes: tuple[str, ...] = VOC_CLASSES
) -> list[Detection]:
    """The images listed in ``root/ImageSets/Main/<split>.txt`` with their VOC boxes.

    Args:
        root: a VOC year folder (e.g. ``VOCdevkit/VOC2012``).
        split: the image set's name (``train``, ``val``, ``trainval``...).
        classes: class names in label order.

    Raises:
        FileNotFoundError: the split list, an annotation or an image is missing (named).
        ValueError: malformed XML, an unknown class, or a box without coordinates.
    """
    root = Path(root)
    listing = root / "ImageSets" / "Main" / f"{split}.txt"
    if not listing.is_file():
        raise FileNotFoundError(
            f"VOC split list {listing} not found (expected the VOC layout: Annotations/, "
            "JPEGImages/, ImageSets/Main/<split>.txt); nothing is downloaded"
        )
    out = []
    for name in listing.read_text().split():
        xml_file = root / "Annotations" / f"{name}.xml"
        if not xml_file.is_file():
            raise FileNotFoundError(f"VOC annotation {xml_file} (listed in {listing}) not found")
        boxes, labels = _voc_objects(xml_file, classes)
        out.append(Detection(read_image(root / "JPEGImages" / f"{name}.jpg"), boxes, labels))
    return out


def load_coco_detection(
    images: str | Path, annotations: str | Path
) -> tuple[list[Detection], list[str]]:
    """COCO-style detection data: every image of the annotation file with its boxes.

    Args:
        images: the folder holding the files named by ``images[*].file_name``.
        annotations: an ``instances_*.json`` file.

    Returns:
        ``(detections, class_names)``; label ``k`` is ``class_names[k]``, the categories
        sorted by id. Crowd annotations (``iscrowd=1``) are left out, as COCO's
        evaluation leaves them out of the positives.

    Raises:
        FileNotFoundError: the annotation file or an image is missing (named).
        ValueError: the file is not JSON or lacks ``images``/``annotations``/``categories``.
    """
    annotations, images = Path(annotations), Path(images)
    if not annotations.is_file():
        raise FileNotFoundError(f"COCO annotation file {annotations} not found")
    try:
        data = json.loads(annotations.read_text())
        categories = sorted(data["categories"], key=lambda c: c["id"])
        records, objects = data["images"], data["annotations"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise ValueError(
            f"{annotations} is not a COCO annotation file (needs images, annotations and "
            f"categories): {error}"
        ) from None
    label_of = {c["id"]: k for k, c in enumerate(categories)}
    per_image: dict[int, list[dict]] = {r["id"]: [] for r in records}
    for obj in objects:
        if not obj.get("iscrowd", 0):
            per_image[obj["image_id"]].append(obj)
    out = []
    for record in records:
        objs = per_image[record["id"]]
        xywh = torch.tensor([o["bbox"] for o in objs], dtype=torch.float32).reshape(-1, 4)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        labels = torch.tensor([label_of[o["category_id"]] for o in objs], dtype=torch.int64)
        out.append(Detection(read_image(images / record["file_name"]), boxes, labels))
    return out, [c["name"] for c in categories]
