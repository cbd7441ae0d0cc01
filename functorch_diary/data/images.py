"""Image files as uint8 ``(C, H, W)`` tensors, read and encoded with Pillow.

- :func:`read_image`: a PNG or JPEG file as RGB ``(3, H, W)`` or gray ``(1, H, W)``.
- :func:`read_mask`: a single-channel PNG of class indices as ``(H, W)``: a gray file's
  values, or a palette file's indices (PASCAL VOC's ``SegmentationClass`` masks).
- :func:`encode_png`: a ``(1|3, H, W)`` uint8 tensor as PNG bytes, for the caller to write
  (so an unwritable path is the caller's ``OSError``, naming it).

torchvision's ``torchvision.io`` decoders and encoders did this before; they are
deprecated since torchvision 0.29. The pixels are the same: PNG exactly, JPEG exactly
too here (both decode with libjpeg-turbo's default settings; ``tests/data/test_images.py``
compares them).

Example:
    >>> import io, torch
    >>> from PIL import Image
    >>> from functorch_diary.data.images import encode_png
    >>> picture = torch.tensor([[[0, 255]], [[10, 20]], [[30, 40]]], dtype=torch.uint8)
    >>> Image.open(io.BytesIO(encode_png(picture))).getpixel((1, 0))
    (255, 20, 40)
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

__all__ = ["encode_png", "read_image", "read_mask"]

# What the data loaders accept: a GIF or a TIFF is an error naming the file, not a guess.
_FORMATS = ("PNG", "JPEG")


def read_image(path: str | Path, gray: bool = False) -> Tensor:
    """The image at ``path`` as a uint8 tensor: RGB ``(3, H, W)``, or ``(1, H, W)`` if ``gray``.

    A gray file read as RGB repeats its channel; an RGBA or palette file drops the
    alpha / looks up the palette; ``gray`` of a colour file is its luma (for a JPEG,
    the decoder's Y channel, as torchvision's ``ImageReadMode.GRAY`` gives it). EXIF
    orientation is not applied (the pixels as stored, like torchvision's default).

    Args:
        path: a PNG or JPEG file with 8 bits per channel.
        gray: read one channel instead of three (a class-index mask: :func:`read_mask`).

    Raises:
        FileNotFoundError: ``path`` is not a file (named).
        ValueError: the file is not a readable 8-bit PNG/JPEG image (named, with the
            decoder's reason).

    Example:
        >>> from functorch_diary.data.images import read_image
        >>> read_image("/nonexistent.png")
        Traceback (most recent call last):
        ...
        FileNotFoundError: image file /nonexistent.png not found
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file {path} not found")
    try:
        with Image.open(path, formats=_FORMATS) as image:
            if image.mode.startswith(("I", "F")):  # 16-bit PNGs: uint8 would clip them
                raise ValueError(f"{image.mode} pixels, not 8 bits per channel")  # wrapped below
            # draft: a JPEG decodes straight to gray (the Y channel) or RGB.
            image.draft("L" if gray else "RGB", image.size)
            pixels = np.array(image.convert("L" if gray else "RGB"))
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path} is not a readable PNG/JPEG image: {error}") from None
    channels_first = torch.from_numpy(pixels).reshape(*pixels.shape[:2], -1).permute(2, 0, 1)
    return channels_first.contiguous()


def read_mask(path: str | Path) -> Tensor:
    """The class-index mask at ``path`` as a uint8 ``(H, W)`` tensor.

    A gray PNG gives its values; a palette PNG its palette *indices*, not their colours
    (VOC's ``SegmentationClass`` files are palette PNGs whose index is the class and 255
    the void border), and a 1-bit PNG 0 and 1. A colour file is refused: its colours are
    not indices, and converting them to gray would make up classes.

    Raises:
        FileNotFoundError: ``path`` is not a file (named).
        ValueError: not a readable 8-bit PNG, or not gray/palette (named, with its mode).

    Example:
        >>> import tempfile, numpy as np
        >>> from PIL import Image
        >>> from functorch_diary.data.images import read_mask
        >>> voc = Image.fromarray(np.array([[0, 1], [15, 255]], dtype=np.uint8), mode="P")
        >>> voc.putpalette([0, 0, 0, 128, 0, 0] * 128)  # colours that are not the indices
        >>> path = tempfile.mkdtemp() + "/mask.png"
        >>> voc.save(path)
        >>> read_mask(path).tolist()
        [[0, 1], [15, 255]]
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"mask file {path} not found")
    try:
        with Image.open(path, formats=("PNG",)) as image:
            if image.mode not in ("L", "P", "1"):
                raise ValueError(
                    f"{image.mode} pixels; a mask is a gray or palette PNG of class indices"
                )
            pixels = np.array(image, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise ValueError(f"{path} is not a readable mask PNG: {error}") from None
    return torch.from_numpy(pixels)


def encode_png(image: Tensor) -> bytes:
    """A uint8 ``(1, H, W)`` (gray) or ``(3, H, W)`` (RGB) tensor as the bytes of a PNG file.

    Raises:
        ValueError: ``image`` is not uint8 with 1 or 3 channels (its dtype and shape named).

    Example:
        >>> import torch
        >>> from functorch_diary.data.images import encode_png
        >>> encode_png(torch.zeros(1, 2, 2, dtype=torch.uint8))[:8]
        b'\\x89PNG\\r\\n\\x1a\\n'
    """
    if image.dtype != torch.uint8 or image.dim() != 3 or image.shape[0] not in (1, 3):
        raise ValueError(
            f"encode_png needs a uint8 (1 or 3, H, W) tensor, got {image.dtype} "
            f"{tuple(image.shape)}; convert with (x * 255).round().byte() for [0, 1] floats"
        )
    pixels = image.cpu().permute(1, 2, 0).numpy()
    picture = Image.fromarray(pixels[:, :, 0] if image.shape[0] == 1 else pixels)
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG")
    return buffer.getvalue()
