"""The synthetic segmentation and detection sets: deterministic, well-formed, pure."""

import torch
from torchvision.ops import box_area, box_iou

from functorch_diary.data.synthetic import SHAPES, detection_set, segmentation_set, unpad_boxes


def test_segmentation_set_is_a_function_of_its_seed():
    state = torch.get_rng_state()
    a, b, c = (
        segmentation_set(6, 24, seed=3),
        segmentation_set(6, 24, seed=3),
        segmentation_set(6, 24, seed=4),
    )
    assert torch.equal(torch.get_rng_state(), state)  # the global generator is never used
    assert torch.equal(a.images, b.images) and torch.equal(a.masks, b.masks)
    assert not torch.equal(a.images, c.images)


def test_segmentation_masks_are_class_indices_and_match_the_pixels():
    seg = segmentation_set(64, 32, seed=0)
    assert seg.images.dtype == torch.float32 and seg.masks.dtype == torch.int64
    assert seg.images.min() >= 0.0 and seg.images.max() <= 1.0
    assert seg.masks.unique().tolist() == list(range(len(SHAPES) + 1))
    # Every image has a shape, and shape pixels are flat colours: inside a shape the
    # image varies only by the 0.04 pixel noise, the background much more.
    assert bool((seg.masks > 0).flatten(1).any(dim=1).all())
    fg = seg.masks[0] == seg.masks[0][seg.masks[0] > 0][0]
    inside = seg.images[0][:, fg]
    assert (
        float(inside.std(dim=1).max())
        < 0.1
        < float(seg.images[0][:, seg.masks[0] == 0].std(dim=1).max())
    )


def test_detection_boxes_are_tight_valid_and_disjoint():
    det = detection_set(32, 64, max_objects=3, seed=1)
    assert torch.equal(det.images, detection_set(32, 64, max_objects=3, seed=1).images)
    counts = (det.labels >= 0).sum(dim=1)
    assert counts.min() >= 1 and counts.max() <= 3
    for boxes, labels in unpad_boxes(det.boxes, det.labels):
        assert labels.min() >= 0 and labels.max() < len(SHAPES)
        assert bool((boxes[:, :2] >= 0).all() and (boxes[:, 2:] <= 64).all())
        assert bool((box_area(boxes) >= 36).all())  # every object at least ~6x6 pixels
        iou = box_iou(boxes, boxes) - torch.eye(len(boxes))
        assert float(iou.max()) == 0.0
    padding = det.labels < 0
    assert bool((det.boxes[padding] == 0).all())


def test_detection_rejects_more_objects_than_cells():
    try:
        detection_set(2, 64, max_objects=5)
    except ValueError as error:
        assert "max_objects must be in 1..4" in str(error)
    else:
        raise AssertionError("max_objects=5 was accepted")
