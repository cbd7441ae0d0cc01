"""Segmentation cross entropy against nn.CrossEntropyLoss; YOLO v1 loss against a loop."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from functorch_diary.testing import assert_trees_close
from functorch_diary.zoo.losses import box_iou_cxcywh, segmentation_cross_entropy, yolo_v1_loss


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 3),
    c=st.integers(2, 5),
    h=st.integers(1, 6),
    w=st.integers(1, 6),
    reduction=st.sampled_from(["mean", "sum", "none"]),
    seed=st.integers(0, 2**16),
)
def test_segmentation_cross_entropy_matches_module(n, c, h, w, reduction, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, h, w, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, c, (n, h, w), generator=g)
    targets[0, 0, 0] = -100  # ignored pixel
    weight = torch.rand(c, dtype=torch.float64, generator=g) + 0.5
    expected = nn.CrossEntropyLoss(weight=weight, reduction=reduction)(logits, targets)
    got = segmentation_cross_entropy(logits, targets, weight=weight, reduction=reduction)
    assert_trees_close(got, expected, rtol=1e-12, atol=1e-12)
    (g_got,) = torch.autograd.grad(got.sum(), logits)
    (g_want,) = torch.autograd.grad(expected.sum(), logits)
    assert_trees_close(g_got, g_want, rtol=1e-12, atol=1e-12)


def test_one_hot_targets_get_seed_004s_explanation():
    logits = torch.randn(4, 4, 6, 6)
    one_hot = nn.functional.one_hot(torch.randint(0, 4, (4, 6, 6)), 4).permute(0, 3, 1, 2)
    with pytest.raises(ValueError, match=r"one-hot.*argmax\(dim=1\)"):
        segmentation_cross_entropy(logits, one_hot)
    # The advice works: the label map gives the loss.
    loss = segmentation_cross_entropy(logits, one_hot.argmax(dim=1))
    assert torch.isfinite(loss)


@pytest.mark.parametrize(
    ("logits_shape", "targets", "message"),
    [
        ((2, 3, 4), torch.zeros(2, 4, dtype=torch.long), r"\(N, C, H, W\)"),
        ((2, 3, 4, 4), torch.zeros(2, 4, 5, dtype=torch.long), r"\(2, 4, 4\)"),
        ((2, 3, 4, 4), torch.zeros(2, 4, 4), "integer class indices"),
    ],
)
def test_bad_shapes_and_dtypes_are_named(logits_shape, targets, message):
    with pytest.raises(ValueError, match=message):
        segmentation_cross_entropy(torch.randn(logits_shape), targets)


def test_segmentation_cross_entropy_does_not_mutate():
    logits, targets = torch.randn(2, 3, 4, 4), torch.randint(0, 3, (2, 4, 4))
    before = (logits.clone(), targets.clone())
    segmentation_cross_entropy(logits, targets)
    assert_trees_close((logits, targets), before)


def _iou(a, b):
    """Plain-Python IoU of two (cx, cy, w, h) boxes."""
    ax0, ay0, ax1, ay1 = a[0] - a[2] / 2, a[1] - a[3] / 2, a[0] + a[2] / 2, a[1] + a[3] / 2
    bx0, by0, bx1, by1 = b[0] - b[2] / 2, b[1] - b[3] / 2, b[0] + b[2] / 2, b[1] + b[3] / 2
    iw, ih = max(0.0, min(ax1, bx1) - max(ax0, bx0)), max(0.0, min(ay1, by1) - max(ay0, by0))
    inter = iw * ih
    return inter / (abs(a[2] * a[3]) + abs(b[2] * b[3]) - inter + 1e-9)


def _yolo_loss_loop(pred, target, s, b, c, l_coord=5.0, l_noobj=0.5, iou_target=True):
    """The YOLO v1 loss written as the paper's sums, cell by cell and box by box."""
    n = pred.shape[0]
    pred = pred.reshape(n, s, s, c + 5 * b)
    total = pred.new_zeros(())
    for i in range(n):
        for row in range(s):
            for col in range(s):
                p, t = pred[i, row, col], target[i, row, col]
                has_obj = bool(t[c + 4] > 0)
                truth = [float(t[c]) + col, float(t[c + 1]) + row, float(t[c + 2]) * s,
                         float(t[c + 3]) * s]  # fmt: skip
                ious = []
                for j in range(b):
                    box = p[c + 5 * j : c + 5 * j + 4].detach()
                    ious.append(_iou([float(box[0]) + col, float(box[1]) + row,
                                      float(box[2]) * s, float(box[3]) * s], truth))  # fmt: skip
                best = max(range(b), key=lambda j: ious[j]) if has_obj else -1
                for j in range(b):
                    x, y, w, h, conf = p[c + 5 * j : c + 5 * j + 5]
                    if j == best:
                        total = total + l_coord * ((x - t[c]) ** 2 + (y - t[c + 1]) ** 2)
                        sw = torch.sign(w) * torch.sqrt(w.abs() + 1e-9)
                        sh = torch.sign(h) * torch.sqrt(h.abs() + 1e-9)
                        total = total + l_coord * ((sw - torch.sqrt(t[c + 2])) ** 2
                                                   + (sh - torch.sqrt(t[c + 3])) ** 2)  # fmt: skip
                        total = total + (conf - (ious[j] if iou_target else 1.0)) ** 2
                    else:
                        total = total + l_noobj * conf**2
                if has_obj:
                    total = total + ((p[:c] - t[:c]) ** 2).sum()
    return total / n


def _yolo_batch(n, s, b, c, seed):
    g = torch.Generator().manual_seed(seed)
    pred = torch.rand(n, s, s, c + 5 * b, dtype=torch.float64, generator=g) * 1.2 - 0.1
    target = torch.zeros(n, s, s, c + 5, dtype=torch.float64)
    obj = torch.rand(n, s, s, generator=g) < 0.4
    classes = torch.randint(0, c, (n, s, s), generator=g)
    target[..., :c] = nn.functional.one_hot(classes, c).double() * obj[..., None]
    target[..., c : c + 4] = torch.rand(n, s, s, 4, dtype=torch.float64, generator=g) * 0.9 + 0.05
    target[..., c : c + 4] *= obj[..., None]
    target[..., c + 4] = obj.double()
    return pred, target


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 2),
    s=st.integers(1, 3),
    b=st.integers(1, 3),
    c=st.integers(1, 4),
    seed=st.integers(0, 2**16),
    lambdas=st.sampled_from([(5.0, 0.5), (2.0, 1.5)]),
    confidence_target=st.sampled_from(["iou", "one"]),
)
def test_yolo_v1_loss_matches_the_papers_sums(n, s, b, c, seed, lambdas, confidence_target):
    pred, target = _yolo_batch(n, s, b, c, seed)
    pred_loop = pred.clone().requires_grad_(True)
    pred_vec = pred.clone().requires_grad_(True)
    expected = _yolo_loss_loop(pred_loop, target, s, b, c, *lambdas, confidence_target == "iou")
    got = yolo_v1_loss(pred_vec, target, num_classes=c, boxes=b, lambda_coord=lambdas[0],
                       lambda_noobj=lambdas[1], confidence_target=confidence_target)  # fmt: skip
    assert_trees_close(got, expected.detach(), rtol=1e-10, atol=1e-12)
    expected.backward()
    got.backward()
    assert_trees_close(pred_vec.grad, pred_loop.grad, rtol=1e-10, atol=1e-12)


def test_yolo_v1_loss_accepts_the_flat_head_output_and_is_pure():
    pred, target = _yolo_batch(2, 7, 2, 20, seed=0)
    before = (pred.clone(), target.clone())
    flat = yolo_v1_loss(pred.reshape(2, -1), target, num_classes=20, grid=7)
    assert_trees_close(flat, yolo_v1_loss(pred, target, num_classes=20))
    assert_trees_close((pred, target), before)
    with pytest.raises(ValueError, match=r"N \* S \* S \* \(C \+ 5B\)"):
        yolo_v1_loss(pred[..., :-1], target, num_classes=20)
    with pytest.raises(ValueError, match='confidence_target must be "iou" or "one", got 1'):
        yolo_v1_loss(pred, target, num_classes=20, confidence_target=1)


def test_perfect_prediction_costs_nothing():
    """A responsible box exactly on the target, with confidence = IoU = 1: zero loss."""
    target = torch.zeros(1, 2, 2, 3 + 5, dtype=torch.float64)
    target[0, 1, 0] = torch.tensor([0, 1, 0, 0.5, 0.5, 0.25, 0.36, 1], dtype=torch.float64)
    pred = torch.zeros(1, 2, 2, 3 + 10, dtype=torch.float64)
    pred[0, 1, 0, :3] = target[0, 1, 0, :3]
    pred[0, 1, 0, 3:8] = torch.tensor([0.5, 0.5, 0.25, 0.36, 1.0], dtype=torch.float64)
    assert float(yolo_v1_loss(pred, target, num_classes=3)) == pytest.approx(0.0, abs=1e-8)
    pred[0, 1, 0, 8 + 4] = 0.5  # the other box's confidence: lambda_noobj * 0.25
    assert float(yolo_v1_loss(pred, target, num_classes=3)) == pytest.approx(0.125, abs=1e-8)


def test_box_iou_of_half_overlapping_unit_boxes():
    a = torch.tensor([0.5, 0.5, 1.0, 1.0])
    b = torch.tensor([1.0, 0.5, 1.0, 1.0])
    assert float(box_iou_cxcywh(a, b)) == pytest.approx(0.5 / 1.5)
    assert math.isclose(float(box_iou_cxcywh(a, a)), 1.0, rel_tol=1e-8)
