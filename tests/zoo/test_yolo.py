"""YOLO v1's ``total_stride`` option: a finer grid on small images, the same keys."""

import pytest
import torch

from functorch_diary.zoo.models import YoloV1, yolo_v1


@pytest.mark.parametrize("stride, grid", [(64, 1), (32, 2), (16, 4)])
def test_total_stride_sets_the_grid_and_keeps_every_key(stride, grid):
    model = yolo_v1(3, image_size=64, width_divisor=16, hidden=8, total_stride=stride)
    params, state = model.init(seed=0)
    paper = YoloV1(3, image_size=64, width_divisor=16, hidden=8)
    convs = {k: v.shape for k, v in params.items() if k.startswith("backbone")}
    assert convs == {k: v.shape for k, v in paper.named_parameters() if k.startswith("backbone")}
    out, _ = model.apply(params, state, torch.zeros(1, 3, 64, 64))
    assert out.shape == (1, grid, grid, 13)


def test_total_stride_errors():
    with pytest.raises(ValueError, match="total_stride must be 64, 32 or 16, got 8"):
        YoloV1(total_stride=8)
    with pytest.raises(ValueError, match=r"divisible by 16 .* got 72"):
        YoloV1(image_size=72, total_stride=16)
