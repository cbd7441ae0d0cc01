"""The darknet cfg parser (seed 003's parse_cfg / create_modules) against hand-written nets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from functorch_diary.testing import assert_trees_close
from functorch_diary.zoo.models import Darknet, darknet_from_cfg, parse_cfg

DATA = Path(__file__).parents[1] / "fixtures"
TINY = (DATA / "tiny_yolov3.cfg").read_text()
YOLOV3 = (DATA / "yolov3.cfg").read_text()  # the real yolov3.cfg's layout, written out
ANCHORS = [(10, 14), (23, 27), (37, 58), (81, 82), (135, 169), (344, 319)]


def cbl(cin: int, cout: int, k: int) -> nn.Sequential:
    """Conv (no bias) + BatchNorm + LeakyReLU(0.1), darknet's "convolutional" with bn."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, k, padding=k // 2, bias=False), nn.BatchNorm2d(cout), nn.LeakyReLU(0.1)
    )


def decode(x: torch.Tensor, anchors, classes: int, input_size: int) -> torch.Tensor:
    """The YOLOv3 tutorial's predict_transform, written with explicit loops over anchors."""
    n, _, h, w = x.shape
    stride = input_size // h
    per_anchor = []
    for a, (aw, ah) in enumerate(anchors):
        t = x[:, a * (5 + classes) : (a + 1) * (5 + classes)]  # (n, 5 + C, h, w)
        gy, gx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(w, dtype=x.dtype),
                                indexing="ij")  # fmt: skip
        cx = (torch.sigmoid(t[:, 0]) + gx) * stride
        cy = (torch.sigmoid(t[:, 1]) + gy) * stride
        bw, bh = torch.exp(t[:, 2]) * aw, torch.exp(t[:, 3]) * ah
        rest = torch.sigmoid(t[:, 4:])
        per_anchor.append(torch.cat([torch.stack([cx, cy, bw, bh], 1), rest], 1))
    # (n, A, 5 + C, h, w) -> cell-major, anchor-minor rows
    stacked = torch.stack(per_anchor, 1).permute(0, 3, 4, 1, 2)
    return stacked.reshape(n, h * w * len(anchors), 5 + classes)


class HandTiny(nn.Module):
    """tests/data/tiny_yolov3.cfg written by hand, layer by layer."""

    def __init__(self):
        super().__init__()
        self.c0, self.c2 = cbl(3, 8, 3), cbl(8, 16, 3)
        self.c4, self.c5 = cbl(16, 8, 1), cbl(8, 16, 3)
        self.c7, self.c9, self.c11 = cbl(16, 32, 3), cbl(32, 64, 3), cbl(64, 128, 3)
        self.c12, self.c13 = cbl(128, 32, 1), cbl(32, 64, 3)
        self.c14 = nn.Conv2d(64, 21, 1)
        self.c17 = cbl(32, 16, 1)
        self.c20 = cbl(48, 32, 3)
        self.c21 = nn.Conv2d(32, 21, 1)

    def forward(self, x):
        size = x.shape[2]
        x3 = F.max_pool2d(self.c2(F.max_pool2d(self.c0(x), 2)), 2)
        x6 = self.c5(self.c4(x3)) + x3
        x7 = self.c7(x6)
        x10 = F.max_pool2d(
            F.pad(self.c9(F.max_pool2d(x7, 2)), (0, 1, 0, 1), value=-torch.inf), 2, 1
        )
        x12 = self.c12(self.c11(x10))
        big = decode(self.c14(self.c13(x12)), ANCHORS[3:], 2, size)
        up = F.interpolate(self.c17(x12), scale_factor=2, mode="nearest")
        small = decode(self.c21(self.c20(torch.cat([up, x7], 1))), ANCHORS[:3], 2, size)
        return torch.cat([big, small], 1)


@pytest.mark.parametrize("train", [False, True])
def test_tiny_cfg_matches_the_hand_written_module(train):
    model = darknet_from_cfg(TINY)
    params, state = model.init(seed=0, dtype=torch.float64)
    state = {k: v + 0.5 if v.is_floating_point() else v for k, v in state.items()}
    hand = HandTiny().double().train(train)
    # Same layers in the same order: copy the functional params into the hand-written net.
    hand_keys = list(hand.state_dict())
    cfg_keys = list(model.state_dict(params, state))
    assert len(hand_keys) == len(cfg_keys)
    merged = {**params, **state}
    hand.load_state_dict({h: merged[c] for h, c in zip(hand_keys, cfg_keys, strict=True)})
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    out, new_state = model.apply(params, state, x, train=train)
    assert out.shape == (2, 4 * 4 * 3 + 8 * 8 * 3, 7)
    assert_trees_close(out, hand(x), rtol=1e-10, atol=1e-12)
    hand_state = dict(zip(cfg_keys, hand.state_dict().values(), strict=True))
    assert_trees_close(new_state, {k: hand_state[k] for k in new_state}, rtol=1e-10, atol=1e-12)


def test_layer_names_follow_seed_003():
    model = darknet_from_cfg(TINY)
    assert "module_list.0.conv_0.weight" in model.param_specs
    assert "module_list.0.batch_norm_0.running_mean" in model.state_specs
    assert "module_list.14.conv_14.bias" in model.param_specs  # linear conv: bias, no bn
    assert isinstance(model.template.module_list[0].leaky_0, nn.LeakyReLU)


def test_the_real_yolov3_layout_parses():
    blocks = parse_cfg(YOLOV3)
    assert blocks[0]["type"] == "net" and blocks[0]["width"] == "608"
    kinds = [b["type"] for b in blocks[1:]]
    counts = {k: kinds.count(k) for k in set(kinds)}
    assert counts == {"convolutional": 75, "shortcut": 23, "route": 4, "upsample": 2, "yolo": 3}
    assert [i for i, k in enumerate(kinds) if k == "yolo"] == [82, 94, 106]
    assert blocks[1 + 86]["layers"] == "-1, 61" and blocks[1 + 98]["layers"] == "-1, 36"
    model = darknet_from_cfg(YOLOV3)
    # YOLOv3 with 80 classes: 61,949,149 trainable numbers (the figure darknet ports report).
    assert sum(s.shape.numel() for s in model.param_specs.values()) == 61_949_149
    # Shapes only, on the meta device: 416x416 gives the well-known 10647 boxes of 85 numbers.
    with torch.no_grad():
        out = model.template.eval()(torch.empty(1, 3, 416, 416, device="meta"))
    assert out.shape == (1, (13 * 13 + 26 * 26 + 52 * 52) * 3, 85)


def test_parse_cfg_strips_comments_and_blank_lines():
    blocks = parse_cfg("# header\n[net]\nchannels = 1  # gray\n\n[route]\nlayers=-1\n")
    assert blocks == [{"type": "net", "channels": "1"}, {"type": "route", "layers": "-1"}]


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ("width=3\n[net]", "before the first"),
        ("[net]\nnonsense", "not key=value"),
        ("[convolutional]\nfilters=1\nsize=1", r"starts with a \[net\]"),
        ("[net]\n[dropout]\nprobability=.5", r"unsupported block type \[dropout\]"),
        ("[net]\n[convolutional]\nsize=3", "needs filters="),
        ("[net]\n[route]\nlayers=-2", "not an earlier layer"),
        ("[net]\n[convolutional]\nfilters=2\nsize=1\nactivation=swish", "unknown activation"),
    ],
)
def test_bad_cfgs_are_named(cfg, message):
    with pytest.raises(ValueError, match=message):
        Darknet(cfg)


def test_darknet_maxpool_stride_one_keeps_the_size():
    cfg = "[net]\nchannels=1\n[maxpool]\nsize=2\nstride=1\n"
    model = darknet_from_cfg(cfg)
    x = torch.arange(9.0).view(1, 1, 3, 3)
    out, _ = model.apply(*model.init(seed=0), x)
    # Each cell: max of itself, its right and lower neighbours (darknet pads right/bottom).
    assert out.squeeze().tolist() == [[4, 5, 5], [7, 8, 8], [7, 8, 8]]
