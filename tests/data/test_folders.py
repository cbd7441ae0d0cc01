"""Segmentation folders, VOC XML and COCO JSON read from files the tests write."""

import json

import pytest
import torch

from functorch_diary.data.folders import (
    load_coco_detection,
    load_segmentation_folder,
    load_voc_detection,
)
from tests.helpers import write_image


def _image(seed, h=6, w=8):
    return torch.randint(
        0, 256, (3, h, w), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8
    )


def test_segmentation_folder_round_trip(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    images, masks = (
        [_image(i) for i in range(2)],
        [torch.randint(0, 4, (1, 6, 8), dtype=torch.uint8) for _ in range(2)],
    )
    for i, (x, m) in enumerate(zip(images, masks, strict=True)):
        write_image(x, tmp_path / "images" / f"b{i}.png")
        write_image(m, tmp_path / "masks" / f"b{i}.png")
    x, y = load_segmentation_folder(tmp_path)
    assert torch.equal(x, torch.stack(images).float() / 255)
    assert torch.equal(y, torch.cat(masks).long())


def test_segmentation_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no images/ folder"):
        load_segmentation_folder(tmp_path)
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    write_image(_image(0), tmp_path / "images" / "a.png")
    with pytest.raises(FileNotFoundError, match=r"mask .*a\.png for image"):
        load_segmentation_folder(tmp_path)
    write_image(torch.zeros(1, 5, 8, dtype=torch.uint8), tmp_path / "masks" / "a.png")
    with pytest.raises(ValueError, match=r"\(6, 8\) and .*\(5, 8\)"):
        load_segmentation_folder(tmp_path)
    (tmp_path / "masks" / "a.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match=r"a\.png is not a readable mask PNG"):
        load_segmentation_folder(tmp_path)


VOC_XML = """<annotation><filename>{name}.jpg</filename>
<object><name>dog</name><bndbox><xmin>2</xmin><ymin>3</ymin><xmax>5</xmax><ymax>6</ymax></bndbox></object>
<object><name>cat</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>8</xmax><ymax>4</ymax></bndbox></object>
</annotation>"""


def _voc(root, names=("000001",)):
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    (root / "ImageSets/Main/train.txt").write_text("\n".join(names) + "\n")
    for name in names:
        (root / "Annotations" / f"{name}.xml").write_text(VOC_XML.format(name=name))
        write_image(_image(1), root / "JPEGImages" / f"{name}.jpg")


def test_voc_boxes_become_zero_based_xyxy(tmp_path):
    _voc(tmp_path)
    (item,) = load_voc_detection(tmp_path)
    assert item.image.shape == (3, 6, 8) and item.image.dtype == torch.uint8
    assert item.boxes.tolist() == [[1.0, 2.0, 5.0, 6.0], [0.0, 0.0, 8.0, 4.0]]
    assert item.labels.tolist() == [11, 7]  # dog, cat in VOC order


def test_voc_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train\.txt not found .*nothing is downloaded"):
        load_voc_detection(tmp_path)
    _voc(tmp_path)
    (tmp_path / "JPEGImages" / "000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match=r"000001\.jpg not found"):
        load_voc_detection(tmp_path)
    (tmp_path / "Annotations" / "000001.xml").write_text("<annotation><object><name>unicorn</name>")
    with pytest.raises(ValueError, match=r"000001\.xml is not valid XML"):
        load_voc_detection(tmp_path)
    (tmp_path / "Annotations" / "000001.xml").write_text(
        "<annotation><object><name>unicorn</name></object></annotation>"
    )
    with pytest.raises(ValueError, match="'unicorn' is not one of"):
        load_voc_detection(tmp_path)


def test_coco_boxes_and_contiguous_labels(tmp_path):
    write_image(_image(2), tmp_path / "a.png")
    data = {
        "images": [{"id": 7, "file_name": "a.png"}],
        "categories": [{"id": 18, "name": "dog"}, {"id": 3, "name": "car"}],
        "annotations": [
            {"image_id": 7, "bbox": [1, 2, 3, 4], "category_id": 18},
            {"image_id": 7, "bbox": [0, 0, 8, 6], "category_id": 3, "iscrowd": 1},
        ],
    }
    (tmp_path / "instances.json").write_text(json.dumps(data))
    (item,), names = load_coco_detection(tmp_path, tmp_path / "instances.json")
    assert names == ["car", "dog"]
    assert item.boxes.tolist() == [[1.0, 2.0, 4.0, 6.0]] and item.labels.tolist() == [1]
    with pytest.raises(FileNotFoundError, match=r"missing\.json not found"):
        load_coco_detection(tmp_path, tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match=r"bad\.json is not a COCO annotation file"):
        load_coco_detection(tmp_path, tmp_path / "bad.json")
