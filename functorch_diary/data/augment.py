"""Pure, keyed, batched augmentation of images together with their masks and boxes.

torchvision's transforms draw their parameters from torch's global generator, one image
at a time. Here every transform is a pure function of ``(batch, key)``: the parameters
of all N images are drawn at once from the :mod:`~functorch_diary.prng` key, and the
batch is transformed with tensor ops only (gathers, ``grid_sample``, a grouped
convolution), so the same key gives the same batch, eagerly or under ``torch.compile``,
and torch's global RNG is never touched.

Each transform comes in two layers:

- ``horizontal_flip(batch, flip)``, ``resized_crop(batch, top, left, height, width)``...
  apply given per-image parameters. Each equals ``torchvision.transforms.v2.functional``
  called image by image with those parameters, on images, masks (nearest sampling) and
  boxes (``tv_tensors.BoundingBoxes`` in XYXY format) alike; ``tests/data/test_augment.py``
  checks every one.
- ``random_horizontal_flip(batch, key, ...)`` ... draw the parameters from the key
  (``draw_*`` returns them) and apply them. :func:`compose` chains them, giving each its
  own key.

A :class:`VisionBatch` holds images ``(N, C, H, W)`` (float), optionally masks
``(N, H, W)`` (class indices) and boxes ``(N, M, 4)`` (XYXY pixels; padding slots are
transformed too and stay marked by their labels, which no transform changes).

Differences from torchvision's random transforms, by design: ``RandomResizedCrop`` and
``RandomErasing`` clamp an out-of-range draw instead of retrying up to ten times (a
retry loop is data-dependent control flow, which neither batches nor compiles); the
resized crop resamples without antialiasing (``antialias=False``); colour jitter applies
brightness, contrast, saturation in that fixed order and has no hue term.

Example:
    >>> import torch
    >>> from functorch_diary import prng
    >>> from functorch_diary.data import augment
    >>> batch = augment.VisionBatch(torch.rand(4, 3, 16, 16), torch.zeros(4, 16, 16).long())
    >>> pipeline = augment.compose(augment.random_resized_crop, augment.random_horizontal_flip)
    >>> out = pipeline(batch, prng.key(0))
    >>> torch.equal(out.images, pipeline(batch, prng.key(0)).images), out.masks.shape
    (True, torch.Size([4, 16, 16]))
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .. import prng

__all__ = [
    "Transform",
    "VisionBatch",
    "color_jitter",
    "compose",
    "draw_color_jitter",
    "draw_erasing",
    "draw_flip",
    "draw_gaussian_blur",
    "draw_pad_crop",
    "draw_resized_crop",
    "draw_rotation",
    "erase",
    "gaussian_blur",
    "horizontal_flip",
    "normalize",
    "pad_crop",
    "random_apply",
    "random_color_jitter",
    "random_erasing",
    "random_gaussian_blur",
    "random_horizontal_flip",
    "random_pad_crop",
    "random_resized_crop",
    "random_rotation",
    "random_vertical_flip",
    "resized_crop",
    "rotate",
    "sanitize_boxes",
    "vertical_flip",
]


class VisionBatch(NamedTuple):
    """Images ``(N, C, H, W)``, optional masks ``(N, H, W)``, optional boxes ``(N, M, 4)``."""

    images: Tensor
    masks: Tensor | None = None
    boxes: Tensor | None = None


#: ``transform(batch, key) -> batch``.
Transform = Callable[[VisionBatch, Tensor], VisionBatch]


def _image_view(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1, 1)


def _mask_view(t: Tensor) -> Tensor:
    return t.view(-1, 1, 1)


def _draws(key: Tensor, count: int, n: int) -> Tensor:
    """``count`` rows of ``n`` uniform [0, 1) float64 numbers from ``key``."""
    return prng.uniform(key, (count, n), dtype=torch.float64)


def _clamp_boxes(boxes: Tensor, height: int | Tensor, width: int | Tensor) -> Tensor:
    """Clamp XYXY boxes ``(N, M, 4)`` to a ``height x width`` canvas (per image if tensors)."""
    if isinstance(width, Tensor):
        limits = torch.stack([width, height, width, height], dim=-1).to(boxes.dtype).view(-1, 1, 4)
    else:
        limits = torch.tensor(
            [width, height, width, height], dtype=boxes.dtype, device=boxes.device
        )
    return torch.minimum(boxes.clamp(min=0), limits)


# ---------------------------------------------------------------------------- flips


def horizontal_flip(batch: VisionBatch, flip: Tensor) -> VisionBatch:
    """Mirror left-right the images where ``flip`` (``(N,)`` bool) is true."""
    images, masks, boxes = batch
    width = images.shape[-1]
    images = torch.where(_image_view(flip), images.flip(-1), images)
    if masks is not None:
        masks = torch.where(_mask_view(flip), masks.flip(-1), masks)
    if boxes is not None:
        mirrored = torch.stack(
            [width - boxes[..., 2], boxes[..., 1], width - boxes[..., 0], boxes[..., 3]], dim=-1
        )
        boxes = torch.where(_mask_view(flip), mirrored, boxes)
    return VisionBatch(images, masks, boxes)


def vertical_flip(batch: VisionBatch, flip: Tensor) -> VisionBatch:
    """Mirror top-bottom the images where ``flip`` (``(N,)`` bool) is true."""
    images, masks, boxes = batch
    height = images.shape[-2]
    images = torch.where(_image_view(flip), images.flip(-2), images)
    if masks is not None:
        masks = torch.where(_mask_view(flip), masks.flip(-2), masks)
    if boxes is not None:
        mirrored = torch.stack(
            [boxes[..., 0], height - boxes[..., 3], boxes[..., 2], height - boxes[..., 1]], dim=-1
        )
        boxes = torch.where(_mask_view(flip), mirrored, boxes)
    return VisionBatch(images, masks, boxes)


def draw_flip(key: Tensor, n: int, p: float = 0.5) -> Tensor:
    """``(N,)`` bools, each true with probability ``p``."""
    return _draws(key, 1, n)[0] < p


def random_horizontal_flip(batch: VisionBatch, key: Tensor, p: float = 0.5) -> VisionBatch:
    """``RandomHorizontalFlip(p)``: each image flipped with probability ``p``."""
    return horizontal_flip(batch, draw_flip(key, len(batch.images), p))


def random_vertical_flip(batch: VisionBatch, key: Tensor, p: float = 0.5) -> VisionBatch:
    """``RandomVerticalFlip(p)``: each image flipped with probability ``p``."""
    return vertical_flip(batch, draw_flip(key, len(batch.images), p))


# ---------------------------------------------------------------------------- crops


def _gather_window(x: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """``out[n, c, i, j] = x[n, c, rows[n, i], cols[n, j]]`` for ``x`` of shape (N, C, H', W')."""
    n, c = x.shape[:2]
    h, w = rows.shape[1], cols.shape[1]
    x = x.gather(2, rows.view(n, 1, h, 1).expand(n, c, h, x.shape[3]))
    return x.gather(3, cols.view(n, 1, 1, w).expand(n, c, h, w))


def pad_crop(batch: VisionBatch, top: Tensor, left: Tensor, padding: int) -> VisionBatch:
    """Zero-pad by ``padding`` on every side, then crop the input's size at ``(top, left)``.

    ``v2.functional.pad(x, [padding])`` then ``crop(x, top, left, H, W)``; masks are padded
    with 0 (background), boxes shifted and clamped to the crop.

    Args:
        top, left: ``(N,)`` int64 corners in the padded image, in ``0 .. 2 * padding``.
    """
    images, masks, boxes = batch
    h, w = images.shape[-2:]
    rows = top.view(-1, 1) + torch.arange(h, device=top.device)
    cols = left.view(-1, 1) + torch.arange(w, device=left.device)
    pad = (padding,) * 4
    images = _gather_window(F.pad(images, pad), rows, cols)
    if masks is not None:
        masks = _gather_window(F.pad(masks[:, None], pad), rows, cols)[:, 0]
    if boxes is not None:
        shift = torch.stack([left, top, left, top], dim=-1).to(boxes.dtype).view(-1, 1, 4)
        boxes = _clamp_boxes(boxes + padding - shift, h, w)
    return VisionBatch(images, masks, boxes)


def draw_pad_crop(key: Tensor, n: int, padding: int) -> tuple[Tensor, Tensor]:
    """``(top, left)``, uniform in ``0 .. 2 * padding`` (``RandomCrop(size, padding)``)."""
    draws = _draws(key, 2, n)
    span = 2 * padding + 1
    return (draws[0] * span).long(), (draws[1] * span).long()


def random_pad_crop(batch: VisionBatch, key: Tensor, padding: int = 4) -> VisionBatch:
    """``RandomCrop(size=(H, W), padding=padding)``: CIFAR's shift augmentation."""
    top, left = draw_pad_crop(key, len(batch.images), padding)
    return pad_crop(batch, top, left, padding)


def _linear_taps(
    start: Tensor, length: Tensor, out: int, dtype: torch.dtype
) -> tuple[Tensor, Tensor, Tensor]:
    """Bilinear source indices and weight along one axis, as ``interpolate`` computes
    them (``align_corners=False``): ``src = (dst + 0.5) * length / out - 0.5``, at least 0."""
    scale = (length.to(dtype) / out).view(-1, 1)
    dst = torch.arange(out, dtype=dtype, device=length.device)
    src = (scale * (dst + 0.5) - 0.5).clamp(min=0)
    low = src.floor().long()
    weight = (src - low).clamp(0, 1)
    high = low + (low < length.view(-1, 1) - 1).long()
    return start.view(-1, 1) + low, start.view(-1, 1) + high, weight


def _nearest_taps(start: Tensor, length: Tensor, out: int) -> Tensor:
    """Nearest source indices as ``interpolate(mode="nearest")``: ``floor(dst * length / out)``
    in float32, as torch computes it, capped at ``length - 1``."""
    scale = (length.float() / out).view(-1, 1)
    dst = torch.arange(out, device=length.device).float()
    index = torch.minimum((dst * scale).floor().long(), length.view(-1, 1) - 1)
    return start.view(-1, 1) + index


def resized_crop(
    batch: VisionBatch, top: Tensor, left: Tensor, height: Tensor, width: Tensor
) -> VisionBatch:
    """Crop ``(top, left, height, width)`` per image and resize it back to ``H x W``.

    ``v2.functional.resized_crop(x, top, left, height, width, [H, W], antialias=False)``:
    bilinear for images, nearest for masks; boxes cropped, clamped and scaled.

    Args:
        top, left, height, width: ``(N,)`` int64 windows inside the image.
    """
    images, masks, boxes = batch
    h, w = images.shape[-2:]
    r0, r1, wy = _linear_taps(top, height, h, images.dtype)
    c0, c1, wx = _linear_taps(left, width, w, images.dtype)
    wy, wx = wy[:, None, :, None], wx[:, None, None, :]
    top_row = _gather_window(images, r0, c0) * (1 - wx) + _gather_window(images, r0, c1) * wx
    bottom_row = _gather_window(images, r1, c0) * (1 - wx) + _gather_window(images, r1, c1) * wx
    images = (1 - wy) * top_row + wy * bottom_row
    if masks is not None:
        rows, cols = _nearest_taps(top, height, h), _nearest_taps(left, width, w)
        masks = _gather_window(masks[:, None], rows, cols)[:, 0]
    if boxes is not None:
        shift = torch.stack([left, top, left, top], dim=-1).to(boxes.dtype).view(-1, 1, 4)
        boxes = _clamp_boxes(boxes - shift, height, width)
        # torchvision's ratios are float32 tensors of float64 quotients: the same rounding.
        ratio = torch.stack([w / width.double(), h / height.double()] * 2, dim=-1).float()
        boxes = boxes * ratio.to(boxes.dtype).view(-1, 1, 4)
    return VisionBatch(images, masks, boxes)


def draw_resized_crop(
    key: Tensor,
    n: int,
    size: tuple[int, int],
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(top, left, height, width)`` as ``RandomResizedCrop.get_params``, one draw each:
    area share uniform in ``scale``, aspect ratio log-uniform in ``ratio``, clamped to
    the image instead of retried."""
    h, w = size
    draws = _draws(key, 4, n)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * draws[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[1])
    width = torch.sqrt(area * aspect).round().long().clamp(1, w)
    height = torch.sqrt(area / aspect).round().long().clamp(1, h)
    top = (draws[2] * (h - height + 1)).long()
    left = (draws[3] * (w - width + 1)).long()
    return top, left, height, width


def random_resized_crop(
    batch: VisionBatch,
    key: Tensor,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> VisionBatch:
    """``RandomResizedCrop(size=(H, W), scale, ratio, antialias=False)``."""
    images = batch.images
    params = draw_resized_crop(key, len(images), tuple(images.shape[-2:]), scale, ratio)
    return resized_crop(batch, *params)


# ---------------------------------------------------------------------------- rotation


def _rotation_grid(angle: Tensor, h: int, w: int, dtype: torch.dtype) -> Tensor:
    """``grid_sample`` grids of ``v2.functional.rotate`` (centre of the image, no expand)."""
    rot = torch.deg2rad(-(angle.double().remainder(360)))
    cos, sin, zero = torch.cos(rot), torch.sin(rot), torch.zeros_like(rot)
    # torchvision's inverse affine matrix [d, -b, 0, -c, a, 0] for a pure rotation.
    theta = torch.stack([cos, sin, zero, -sin, cos, zero], dim=-1).to(dtype).view(-1, 2, 3)
    xs = torch.linspace((1.0 - w) * 0.5, (w - 1.0) * 0.5, steps=w, dtype=dtype, device=angle.device)
    ys = torch.linspace((1.0 - h) * 0.5, (h - 1.0) * 0.5, steps=h, dtype=dtype, device=angle.device)
    base = torch.stack(
        [
            xs.expand(h, w),
            ys.view(h, 1).expand(h, w),
            torch.ones(h, w, dtype=dtype, device=xs.device),
        ],
        dim=-1,
    )
    half = torch.tensor([0.5 * w, 0.5 * h], dtype=dtype, device=xs.device)
    rescaled = theta.transpose(1, 2) / half
    return base.view(1, h * w, 3).expand(len(angle), -1, -1).bmm(rescaled).view(-1, h, w, 2)


def rotate(batch: VisionBatch, angle: Tensor) -> VisionBatch:
    """Rotate each image by ``angle`` degrees (``(N,)``, counter-clockwise) about its centre.

    ``v2.functional.rotate(x, angle, InterpolationMode.BILINEAR)`` for images (zeros
    outside), nearest for masks (background outside), and for boxes the clamped box
    around the four rotated corners.
    """
    images, masks, boxes = batch
    h, w = images.shape[-2:]
    grid = _rotation_grid(angle, h, w, images.dtype)
    images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if masks is not None:
        # torchvision samples integer masks on a float32 grid and rounds back.
        grid32 = _rotation_grid(angle, h, w, torch.float32)
        sampled = F.grid_sample(
            masks[:, None].float(),
            grid32,
            mode="nearest",
            padding_mode="zeros",
            align_corners=False,
        )
        masks = sampled.round()[:, 0].to(masks.dtype)
    if boxes is not None:
        # torchvision's forward (not inverted) affine matrix for the angle -angle.
        rot = torch.deg2rad(-angle.double())
        a, b = torch.cos(rot), -torch.sin(rot)
        c, d = torch.sin(rot), torch.cos(rot)
        cx, cy = w * 0.5, h * 0.5
        ex, ey = cx - a * cx - b * cy, cy - c * cx - d * cy
        matrix = torch.stack([a, b, ex, c, d, ey], dim=-1).to(boxes.dtype).view(-1, 1, 1, 2, 3)
        x1, y1, x2, y2 = boxes.unbind(-1)
        corners = torch.stack(
            [torch.stack([x1, y1], -1), torch.stack([x2, y1], -1), torch.stack([x2, y2], -1),
             torch.stack([x1, y2], -1)],
            dim=-2,
        )  # (N, M, 4, 2)  # fmt: skip
        points = torch.cat([corners, torch.ones_like(corners[..., :1])], dim=-1)
        moved = (matrix @ points.unsqueeze(-1)).squeeze(-1)  # (N, M, 4, 2)
        boxes = _clamp_boxes(torch.cat([moved.amin(dim=-2), moved.amax(dim=-2)], dim=-1), h, w)
    return VisionBatch(images, masks, boxes)


def draw_rotation(key: Tensor, n: int, degrees: float) -> Tensor:
    """Angles uniform in ``[-degrees, degrees]`` (``RandomRotation(degrees)``)."""
    return (_draws(key, 1, n)[0] * 2 - 1) * degrees


def random_rotation(batch: VisionBatch, key: Tensor, degrees: float = 15.0) -> VisionBatch:
    """``RandomRotation(degrees, InterpolationMode.BILINEAR)``."""
    return rotate(batch, draw_rotation(key, len(batch.images), degrees))


# ---------------------------------------------------------------------------- photometric


def _grayscale(images: Tensor) -> Tensor:
    r, g, b = images.unbind(dim=-3)
    return (r * 0.2989 + g * 0.587 + b * 0.114).unsqueeze(-3)


def _blend(images: Tensor, other: Tensor, ratio: Tensor) -> Tensor:
    ratio = _image_view(ratio).to(images.dtype)
    return (images * ratio + other * (1.0 - ratio)).clamp(0.0, 1.0)


def color_jitter(
    batch: VisionBatch, brightness: Tensor, contrast: Tensor, saturation: Tensor
) -> VisionBatch:
    """``adjust_brightness``, then ``adjust_contrast``, then ``adjust_saturation`` with
    per-image factors ``(N,)``, on images in [0, 1]; masks and boxes are unchanged."""
    images = (batch.images * _image_view(brightness).to(batch.images.dtype)).clamp(0.0, 1.0)
    images = _blend(images, _grayscale(images).mean(dim=(-3, -2, -1), keepdim=True), contrast)
    images = _blend(images, _grayscale(images), saturation)
    return batch._replace(images=images)


def draw_color_jitter(
    key: Tensor, n: int, brightness: float, contrast: float, saturation: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Factors uniform in ``[max(0, 1 - s), 1 + s]`` for each strength ``s`` (``ColorJitter``)."""
    draws = _draws(key, 3, n)
    return tuple(
        max(0.0, 1.0 - s) + (1.0 + s - max(0.0, 1.0 - s)) * u
        for s, u in zip((brightness, contrast, saturation), draws, strict=True)
    )


def random_color_jitter(
    batch: VisionBatch,
    key: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
) -> VisionBatch:
    """``ColorJitter(brightness, contrast, saturation)`` in that fixed order."""
    factors = draw_color_jitter(key, len(batch.images), brightness, contrast, saturation)
    return color_jitter(batch, *factors)


def gaussian_blur(batch: VisionBatch, sigma: Tensor, kernel_size: int) -> VisionBatch:
    """``v2.functional.gaussian_blur(x, [k, k], [s, s])`` with a per-image ``sigma`` ``(N,)``:
    torchvision's kernel, reflect padding, one grouped convolution for the whole batch."""
    images = batch.images
    n, c, h, w = images.shape
    lim = (kernel_size - 1) / (2.0 * math.sqrt(2.0))
    xs = torch.linspace(-lim, lim, steps=kernel_size, dtype=images.dtype, device=images.device)
    kernel1d = torch.softmax(-(xs / sigma.to(images.dtype).view(-1, 1)).pow(2), dim=1)
    kernel2d = kernel1d[:, :, None] * kernel1d[:, None, :]  # (N, k, k)
    weight = kernel2d.repeat_interleave(c, dim=0)[:, None]  # one filter per (image, channel)
    pad = kernel_size // 2
    padded = F.pad(images, (pad, pad, pad, pad), mode="reflect").reshape(1, n * c, h + 2 * pad, -1)
    out = F.conv2d(padded, weight, groups=n * c).reshape(n, c, h, w)
    return batch._replace(images=out)


def draw_gaussian_blur(key: Tensor, n: int, sigma: tuple[float, float]) -> Tensor:
    """Sigmas uniform in ``sigma`` (``GaussianBlur(kernel_size, sigma)``)."""
    return sigma[0] + (sigma[1] - sigma[0]) * _draws(key, 1, n)[0]


def random_gaussian_blur(
    batch: VisionBatch, key: Tensor, kernel_size: int = 3, sigma: tuple[float, float] = (0.1, 2.0)
) -> VisionBatch:
    """``GaussianBlur(kernel_size, sigma)``."""
    return gaussian_blur(batch, draw_gaussian_blur(key, len(batch.images), sigma), kernel_size)


def erase(
    batch: VisionBatch, top: Tensor, left: Tensor, height: Tensor, width: Tensor, value: float = 0.0
) -> VisionBatch:
    """``v2.functional.erase(x, top, left, height, width, value)`` per image (``height=0``
    erases nothing); masks and boxes are unchanged, as torchvision leaves them."""
    images = batch.images
    h, w = images.shape[-2:]
    rows = torch.arange(h, device=images.device).view(1, h, 1)
    cols = torch.arange(w, device=images.device).view(1, 1, w)
    inside = (
        (rows >= _mask_view(top))
        & (rows < _mask_view(top + height))
        & (cols >= _mask_view(left))
        & (cols < _mask_view(left + width))
    )
    return batch._replace(images=images.masked_fill(inside[:, None], value))


def draw_erasing(
    key: Tensor,
    n: int,
    size: tuple[int, int],
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(top, left, height, width)`` as ``RandomErasing.get_params`` (one draw, clamped);
    images not chosen (probability ``1 - p``) get ``height = 0``."""
    h, w = size
    draws = _draws(key, 5, n)
    area = h * w * (scale[0] + (scale[1] - scale[0]) * draws[0])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * draws[1])
    height = torch.sqrt(area * aspect).round().long().clamp(1, h)
    width = torch.sqrt(area / aspect).round().long().clamp(1, w)
    top = (draws[2] * (h - height + 1)).long()
    left = (draws[3] * (w - width + 1)).long()
    return top, left, torch.where(draws[4] < p, height, 0), width


def random_erasing(
    batch: VisionBatch,
    key: Tensor,
    p: float = 0.5,
    scale: tuple[float, float] = (0.02, 0.33),
    ratio: tuple[float, float] = (0.3, 3.3),
    value: float = 0.0,
) -> VisionBatch:
    """``RandomErasing(p, scale, ratio, value)``."""
    images = batch.images
    params = draw_erasing(key, len(images), tuple(images.shape[-2:]), p, scale, ratio)
    return erase(batch, *params, value=value)


def normalize(batch: VisionBatch, mean: Sequence[float], std: Sequence[float]) -> VisionBatch:
    """``v2.functional.normalize``: ``(x - mean) / std`` per channel; nothing random."""
    images = batch.images
    m = torch.tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return batch._replace(images=(images - m) / s)


def sanitize_boxes(
    boxes: Tensor,
    labels: Tensor,
    canvas_size: tuple[int, int],
    min_size: float = 1.0,
    min_area: float = 1.0,
) -> tuple[Tensor, Tensor]:
    """Drop degenerate and out-of-image boxes from a padded ``(N, M, 4)`` batch.

    ``v2.SanitizeBoundingBoxes(min_size, min_area)``'s rule (a side under ``min_size``,
    an area under ``min_area``, or a coordinate outside ``canvas_size = (H, W)``), but a
    dropped box becomes a padding slot, a zero box with label -1, instead of leaving the
    tensor: the batch keeps its shape, so it stacks, batches and compiles. Call it after
    the geometric transforms, which clamp boxes to the image (one that left it entirely
    is clamped to a zero-width box at the edge, and dropped here).

    Args:
        boxes: ``(N, M, 4)`` XYXY pixels.
        labels: ``(N, M)`` integer classes, -1 for padding (kept -1).

    Returns:
        ``(boxes, labels)``, new tensors of the same shapes.

    Example:
        >>> boxes = torch.tensor([[[0.0, 0.0, 4.0, 4.0], [6.0, 2.0, 6.0, 5.0]]])
        >>> sanitize_boxes(boxes, torch.tensor([[2, 1]]), (8, 8))[1]
        tensor([[ 2, -1]])
    """
    height, width = canvas_size
    sizes = boxes[..., 2:] - boxes[..., :2]
    limits = torch.tensor([width, height] * 2, dtype=boxes.dtype, device=boxes.device)
    valid = (
        (labels >= 0)
        & (sizes >= min_size).all(dim=-1)
        & (sizes.prod(dim=-1) >= min_area)
        & (boxes >= 0).all(dim=-1)
        & (boxes <= limits).all(dim=-1)
    )
    return torch.where(valid[..., None], boxes, 0.0), torch.where(valid, labels, -1)


def random_apply(transform: Transform, p: float = 0.5) -> Transform:
    """``RandomApply([transform], p)`` per image: each image of the batch (with its mask
    and boxes) is ``transform``'s output with probability ``p``, else left as it was.

    The choice is drawn from ``fold_in(key, 0)`` and ``transform`` gets ``fold_in(key, 1)``.
    The whole batch is transformed and each image picks its version (no data-dependent
    branch, so it batches and compiles).

    Example:
        >>> batch = VisionBatch(torch.linspace(0, 1, 6 * 3 * 8 * 8).view(6, 3, 8, 8))
        >>> out = random_apply(random_rotation, p=0.5)(batch, prng.key(0))
        >>> [bool(torch.equal(o, i)) for o, i in zip(out.images, batch.images)]
        [False, True, False, False, False, True]
    """

    def apply(batch: VisionBatch, key: Tensor) -> VisionBatch:
        chosen = draw_flip(prng.fold_in(key, 0), len(batch.images), p)  # (N,) Bernoulli(p)
        transformed = transform(batch, prng.fold_in(key, 1))
        views = (_image_view, _mask_view, _mask_view)
        return VisionBatch(
            *(
                None if old is None else torch.where(view(chosen), new, old)
                for view, new, old in zip(views, transformed, batch, strict=True)
            )
        )

    return apply


def compose(*transforms: Transform) -> Transform:
    """Chain ``transform(batch, key)`` functions; the ``i``-th gets ``prng.fold_in(key, i)``.

    Pass options with ``functools.partial`` (``partial(random_rotation, degrees=10)``).
    """

    def pipeline(batch: VisionBatch, key: Tensor) -> VisionBatch:
        for index, transform in enumerate(transforms):
            batch = transform(batch, prng.fold_in(key, index))
        return batch

    return pipeline
