"""Decoding, NMS and mAP@0.5 on hand-made cases whose answers are worked out by hand."""

import pytest
import torch
from torchvision.ops import box_convert

from functorch_diary.zoo import detection
from functorch_diary.zoo.detection import Detections
from functorch_diary.zoo.models import darknet_from_cfg

GT = torch.tensor([[0.0, 0.0, 10.0, 10.0], [20.0, 20.0, 30.0, 30.0]])


def _dets(boxes, scores, labels):
    return Detections(torch.tensor(boxes), torch.tensor(scores), torch.tensor(labels))


def test_perfect_detections_give_map_one():
    dets = [_dets(GT.tolist(), [0.9, 0.8], [0, 1])]
    mean, per_class = detection.mean_average_precision(dets, [(GT, torch.tensor([0, 1]))], 3)
    assert mean == 1.0 and per_class == [1.0, 1.0, None]  # class 2 has no ground truth


def test_false_positive_between_two_hits():
    # Sorted by score: hit, miss, hit. Precision 1, 1/2, 2/3 at recall 1/2, 1/2, 1; the
    # envelope is 1 up to recall 1/2 and 2/3 after: AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    dets = [_dets([[0, 0, 10, 10], [50, 50, 60, 60], [20, 20, 30, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    mean, _ = detection.mean_average_precision(dets, [(GT, torch.tensor([0, 0]))], 1)
    assert mean == pytest.approx(5 / 6, abs=1e-12)


def test_duplicate_and_low_iou_detections_are_false_positives():
    # A duplicate of a matched box, then a box of IoU 1/3 with the second one (x shifted
    # by 5 of its 10 pixels: overlap 50, union 150): both misses, recall stays 1/2.
    dets = [_dets([[0, 0, 10, 10], [0, 0, 10, 10], [25, 20, 35, 30]], [0.9, 0.8, 0.7], [0, 0, 0])]
    mean, _ = detection.mean_average_precision(dets, [(GT, torch.tensor([0, 0]))], 1)
    assert mean == pytest.approx(0.5, abs=1e-12)
    # At an IoU threshold of 0.3 the shifted box counts: hit, miss, hit = 5/6 again.
    mean, _ = detection.mean_average_precision(dets, [(GT, torch.tensor([0, 0]))], 1, 0.3)
    assert mean == pytest.approx(5 / 6, abs=1e-12)


def test_wrong_class_and_other_image():
    # Image 0: the class-1 box is found with label 0 (AP_1 = 0, AP_0 has a false positive
    # after its hit: 1); image 1 has no objects: its detection is a miss for class 0.
    dets = [_dets(GT.tolist(), [0.9, 0.6], [0, 0]), _dets([[1, 1, 5, 5]], [0.95], [0])]
    targets = [(GT, torch.tensor([0, 1])), (torch.zeros(0, 4), torch.zeros(0, dtype=torch.long))]
    mean, per_class = detection.mean_average_precision(dets, targets, 2)
    # Class 0 in score order: miss (0.95), hit (0.9), miss (0.6): precision 0, 1/2, 1/3 at
    # recall 0, 1, 1: envelope 1/2 over recall 0..1, AP_0 = 1/2.
    assert per_class == [pytest.approx(0.5), 0.0] and mean == pytest.approx(0.25)


def test_yolo_v1_decoding_by_hand():
    # S = 2, C = 2, B = 2; cell (row 1, col 0), box 0: centre (0.5, 0.5) in the cell,
    # size (0.25, 0.5) of the 64-pixel image, confidence 0.9, classes (0.2, 0.8).
    pred = torch.zeros(1, 2, 2, 12)
    pred[0, 1, 0, :2] = torch.tensor([0.2, 0.8])
    pred[0, 1, 0, 2:7] = torch.tensor([0.5, 0.5, 0.25, 0.5, 0.9])
    boxes, scores, labels = detection.decode_yolo_v1(pred, num_classes=2, boxes=2, image_size=64)
    row = (1 * 2 + 0) * 2 + 0  # cell-major, box-minor
    assert boxes[0, row].tolist() == [8.0, 32.0, 24.0, 64.0]
    assert scores[0, row].item() == pytest.approx(0.72) and labels[0, row].item() == 1
    assert float(scores.sum()) == pytest.approx(0.72)  # every other box has confidence 0


def test_yolo_v1_targets_decode_back_to_the_boxes():
    boxes = torch.tensor([[[2.0, 4.0, 30.0, 20.0], [40.0, 36.0, 60.0, 62.0], [0, 0, 0, 0]]])
    labels = torch.tensor([[2, 0, -1]])
    target = detection.encode_yolo_v1(boxes, labels, grid=4, num_classes=3, image_size=64)
    assert int(target[..., -1].sum()) == 2  # one cell per object, padding ignored
    (found,) = detection.postprocess(*detection.decode_yolo_v1(target, 3, 1, 64))
    assert torch.allclose(found.boxes, boxes[0, :2], atol=1e-5)
    assert found.labels.tolist() == [2, 0] and found.scores.tolist() == [1.0, 1.0]


def test_postprocess_thresholds_and_per_class_nms():
    boxes = torch.tensor([[[0.0, 0, 10, 10], [1, 0, 11, 10], [1, 0, 11, 10], [40, 40, 50, 50]]])
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    labels = torch.tensor([[0, 0, 1, 0]])
    (out,) = detection.postprocess(boxes, scores, labels, score_threshold=0.2)
    # Box 1 overlaps box 0 (IoU 9/11) in its class: suppressed; box 2 is another class;
    # box 3 is below the score threshold.
    assert out.scores.tolist() == pytest.approx([0.9, 0.7]) and out.labels.tolist() == [0, 1]


CFG = """
[net]
channels=3
[convolutional]
batch_normalize=1
filters=4
size=3
stride=2
pad=1
activation=leaky
[convolutional]
filters=14
size=1
stride=1
pad=1
activation=linear
[yolo]
mask=0,1
anchors=4,6, 8,10
classes=2
"""


def test_darknet_detection_rows_decode_to_xyxy():
    model = darknet_from_cfg(CFG)
    params, state = model.init(seed=0)
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    rows, _ = model.apply(params, state, x)
    boxes, scores, labels = detection.decode_darknet(rows, 16)
    assert boxes.shape == (1, 128, 4)  # 8 x 8 cells x 2 anchors
    expected = box_convert(rows[..., :4], "cxcywh", "xyxy").clamp(0, 16)
    assert torch.equal(boxes, expected)
    best, label = rows[..., 5:].max(-1)
    assert torch.equal(scores, rows[..., 4] * best) and torch.equal(labels, label)


def test_map_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="1 images of detections but 2 of targets"):
        detection.mean_average_precision([_dets([], [], [])], [(GT, GT[:, 0])] * 2, 1)
