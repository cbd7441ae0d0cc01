"""Darknet ``.cfg`` files as functional models (``parse_cfg``/``create_modules``).

The YOLOv3 tutorial has two steps: ``parse_cfg`` turns the
cfg text into a list of blocks (dicts), and ``create_modules`` turns each block into an
``nn.Sequential`` inside one ``nn.ModuleList``, naming the layers ``conv_{i}``,
``batch_norm_{i}``, ``leaky_{i}``, ... Both steps are written out here, with the parts
the seed elides, and :func:`darknet_from_cfg` wraps the result as a :class:`Model`, so the
params are keyed ``module_list.0.conv_0.weight`` like the tutorial's module.

Supported blocks: ``[net]`` (input channels), ``[convolutional]`` (``batch_normalize``,
``filters``, ``size``, ``stride``, ``pad``, ``activation`` = leaky / linear / relu /
mish), ``[shortcut]`` (``from``), ``[route]`` (``layers``, relative or absolute, any
number), ``[upsample]`` (``stride``, nearest), ``[maxpool]`` (``size``, ``stride``,
darknet's asymmetric padding) and ``[yolo]`` (``mask``, ``anchors``, ``classes``).

The forward pass returns the detections of every ``[yolo]`` layer concatenated, each
``(N, H * W * A, 5 + classes)`` with box centres and sizes in input pixels and
sigmoid objectness and class scores, as the tutorial's ``predict_transform`` does.

Example:
    >>> import torch
    >>> from functorch_diary.zoo.models import darknet_from_cfg
    >>> cfg = '''
    ... [net]
    ... channels=3
    ... [convolutional]
    ... batch_normalize=1
    ... filters=8
    ... size=3
    ... stride=2
    ... pad=1
    ... activation=leaky
    ... [convolutional]
    ... filters=21
    ... size=1
    ... stride=1
    ... pad=1
    ... activation=linear
    ... [yolo]
    ... mask=0,1,2
    ... anchors=10,13, 16,30, 33,23
    ... classes=2
    ... '''
    >>> model = darknet_from_cfg(cfg)
    >>> params, state = model.init(seed=0)
    >>> sorted(params)[:2]
    ['module_list.0.batch_norm_0.bias', 'module_list.0.batch_norm_0.weight']
    >>> model.apply(params, state, torch.randn(1, 3, 32, 32))[0].shape
    torch.Size([1, 768, 7])
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ...model.core import Model

__all__ = [
    "Darknet",
    "DarknetMaxPool",
    "YoloLayer",
    "create_modules",
    "darknet_from_cfg",
    "parse_cfg",
]

Block = dict[str, str]


def parse_cfg(text: str) -> list[Block]:
    """Split darknet cfg text into blocks: ``[{"type": "net", ...}, {"type": ...}, ...]``.

    Comments (``#``) and blank lines are dropped; keys and values are stripped strings.

    Args:
        text: the content of a ``.cfg`` file.

    Returns:
        One dict per ``[section]``, in order, with the section name under ``"type"``.

    Raises:
        ValueError: a ``key=value`` line before the first section, or a line that is
            neither (the message gives the line number).

    Example:
        >>> parse_cfg("[net]\\nwidth=416 # input\\n\\n[upsample]\\nstride=2")
        [{'type': 'net', 'width': '416'}, {'type': 'upsample', 'stride': '2'}]
    """
    blocks: list[Block] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            blocks.append({"type": line[1:-1].strip()})
        elif "=" in line and blocks:
            key, value = line.split("=", 1)
            blocks[-1][key.strip()] = value.strip()
        else:
            where = "not key=value" if blocks else "before the first [section]"
            raise ValueError(f"cfg line {number}: {raw.strip()!r} is {where}")
    return blocks


class DarknetMaxPool(nn.Module):
    """Darknet's max pool: pads ``size - 1`` cells with -inf, ``(size - 1) // 2`` of them
    before and the rest after, so ``size=2, stride=1`` keeps the map size (tiny YOLOv3)."""

    def __init__(self, size: int, stride: int):
        super().__init__()
        self.size, self.stride = size, stride
        pad = size - 1
        self.padding = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.pad(x, self.padding, value=float("-inf")), self.size, self.stride)


class YoloLayer(nn.Module):
    """Decodes one detection scale: ``(N, A * (5 + C), H, W)`` -> ``(N, H * W * A, 5 + C)``.

    Centres become ``(sigmoid(t) + cell) * stride``, sizes ``exp(t) * anchor`` (anchors in
    input pixels), objectness and classes ``sigmoid``.
    """

    def __init__(self, anchors: list[tuple[int, int]], num_classes: int):
        super().__init__()
        self.anchors, self.num_classes = tuple(anchors), num_classes

    def forward(self, x: Tensor, input_size: int) -> Tensor:
        h, w = x.shape[2:]
        a, attrs = len(self.anchors), 5 + self.num_classes
        # Cell-major, anchor-minor order, as the tutorial's view/transpose produces.
        p = rearrange(x, "n (a k) h w -> n h w a k", a=a, k=attrs)
        stride = input_size // h
        rows = torch.arange(h, dtype=x.dtype, device=x.device).view(1, h, 1, 1)
        cols = torch.arange(w, dtype=x.dtype, device=x.device).view(1, 1, w, 1)
        anchors = torch.tensor(self.anchors, dtype=x.dtype, device=x.device)
        cx = (torch.sigmoid(p[..., 0]) + cols) * stride
        cy = (torch.sigmoid(p[..., 1]) + rows) * stride
        wh = torch.exp(p[..., 2:4]) * anchors
        scores = torch.sigmoid(p[..., 4:])
        out = torch.cat([cx[..., None], cy[..., None], wh, scores], dim=-1)
        return rearrange(out, "n h w a k -> n (h w a) k")


def _int(block: Block, index: int, key: str, default: int | None = None) -> int:
    if key not in block:
        if default is None:
            raise ValueError(f"cfg block {index} [{block['type']}] needs {key}=")
        return default
    return int(block[key])


def _ints(value: str) -> list[int]:
    return [int(v) for v in value.split(",") if v.strip()]


_ACTIVATIONS = {
    "leaky": lambda: nn.LeakyReLU(0.1),
    "relu": nn.ReLU,
    "mish": nn.Mish,
}


def _sources(block: Block, index: int, count: int) -> list[int]:
    """Absolute layer indices a route/shortcut reads, checked to lie before ``index``."""
    refs = _ints(block["layers"]) if block["type"] == "route" else [-1, _int(block, index, "from")]
    absolute = [ref if ref >= 0 else index + ref for ref in refs]
    for ref, where in zip(refs, absolute, strict=True):
        if not 0 <= where < min(index, count):
            raise ValueError(
                f"cfg block {index} [{block['type']}] refers to layer {ref} (absolute {where}), "
                f"which is not an earlier layer"
            )
    return absolute


def create_modules(blocks: list[Block]) -> tuple[Block, nn.ModuleList]:
    """The tutorial's ``create_modules``: one ``nn.Sequential`` per block after ``[net]``.

    Args:
        blocks: the output of :func:`parse_cfg`; the first must be ``[net]``.

    Returns:
        ``(net_info, module_list)``; route and shortcut blocks get an empty
        ``nn.Sequential`` (their work is done in :meth:`Darknet.forward`).

    Raises:
        ValueError: an unknown block type, a missing key, or a reference to a later layer.
    """
    if not blocks or blocks[0]["type"] != "net":
        raise ValueError("a darknet cfg starts with a [net] block")
    net_info = blocks[0]
    module_list = nn.ModuleList()
    prev_filters = _int(net_info, 0, "channels", 3)
    output_filters: list[int] = []
    for index, block in enumerate(blocks[1:]):
        module = nn.Sequential()
        kind = block["type"]
        filters = prev_filters
        if kind == "convolutional":
            batch_norm = bool(_int(block, index, "batch_normalize", 0))
            filters = _int(block, index, "filters")
            size = _int(block, index, "size")
            padding = (size - 1) // 2 if _int(block, index, "pad", 0) else 0
            conv = nn.Conv2d(
                prev_filters,
                filters,
                size,
                _int(block, index, "stride", 1),
                padding,
                bias=not batch_norm,
            )
            module.add_module(f"conv_{index}", conv)
            if batch_norm:
                module.add_module(f"batch_norm_{index}", nn.BatchNorm2d(filters))
            activation = block.get("activation", "linear")
            if activation in _ACTIVATIONS:
                module.add_module(f"{activation}_{index}", _ACTIVATIONS[activation]())
            elif activation != "linear":
                raise ValueError(
                    f"cfg block {index} [convolutional]: unknown activation {activation!r}"
                )
        elif kind == "upsample":
            module.add_module(
                f"upsample_{index}",
                nn.Upsample(scale_factor=_int(block, index, "stride", 2), mode="nearest"),
            )
        elif kind == "maxpool":
            size = _int(block, index, "size", 2)
            module.add_module(
                f"maxpool_{index}", DarknetMaxPool(size, _int(block, index, "stride", size))
            )
        elif kind == "route":
            filters = sum(output_filters[i] for i in _sources(block, index, len(output_filters)))
        elif kind == "shortcut":
            _sources(block, index, len(output_filters))
        elif kind == "yolo":
            mask = _ints(block.get("mask", ""))
            pairs = _ints(block["anchors"])
            anchors = [(pairs[2 * i], pairs[2 * i + 1]) for i in range(len(pairs) // 2)]
            chosen = [anchors[i] for i in mask] if mask else anchors
            module.add_module(
                f"Detection_{index}", YoloLayer(chosen, _int(block, index, "classes"))
            )
        else:
            raise ValueError(f"cfg block {index}: unsupported block type [{kind}]")
        module_list.append(module)
        prev_filters = filters
        output_filters.append(filters)
    return net_info, module_list


class Darknet(nn.Module):
    """The imperative twin: the network a darknet cfg describes.

    Args:
        cfg: the cfg file's text (not a path: read it yourself, nothing is fetched).
    """

    def __init__(self, cfg: str):
        super().__init__()
        self.blocks = parse_cfg(cfg)
        self.net_info, self.module_list = create_modules(self.blocks)

    def forward(self, x: Tensor) -> Tensor:
        input_size = x.shape[2]
        outputs: list[Tensor] = []
        detections: list[Tensor] = []
        for index, (block, module) in enumerate(
            zip(self.blocks[1:], self.module_list, strict=True)
        ):
            kind = block["type"]
            if kind == "route":
                x = torch.cat([outputs[i] for i in _sources(block, index, index)], dim=1)
            elif kind == "shortcut":
                a, b = _sources(block, index, index)
                x = outputs[a] + outputs[b]
            elif kind == "yolo":
                detections.append(module[0](x, input_size))
            else:
                x = module(x)
            outputs.append(x)
        if not detections:
            return x
        return torch.cat(detections, dim=1)


def darknet_from_cfg(cfg: str) -> Model:
    """The functional :class:`Darknet` of a cfg text (e.g. ``Path("yolov3.cfg").read_text()``)."""
    return Model(partial(Darknet, cfg))
