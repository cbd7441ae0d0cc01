"""PNG/JPEG files read and PNG encoded with Pillow: the pixels written come back exactly,
JPEG decodes equal torchvision's decode_jpeg, and a bad file is an error naming it."""

import io
import re

import numpy as np
import pytest
import torch
from PIL import Image

from functorch_diary.data.images import encode_png, read_image, read_mask
from tests.helpers import write_image


def _pixels(channels, seed, h=7, w=9):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (channels, h, w), generator=generator, dtype=torch.uint8)


@pytest.mark.parametrize("channels", [3, 1])
def test_png_reads_back_the_pixels_written(tmp_path, channels):
    pixels = _pixels(channels, seed=channels)
    write_image(pixels, tmp_path / "a.png")
    read = read_image(tmp_path / "a.png", gray=channels == 1)
    assert read.dtype == torch.uint8 and torch.equal(read, pixels)


def test_png_modes_become_rgb_or_gray(tmp_path):
    gray, rgb = _pixels(1, seed=0), _pixels(3, seed=1)
    write_image(gray, tmp_path / "gray.png")
    assert torch.equal(read_image(tmp_path / "gray.png"), gray.expand(3, -1, -1))
    alpha = torch.cat([rgb, _pixels(1, seed=2)])
    Image.fromarray(alpha.permute(1, 2, 0).numpy(), "RGBA").save(tmp_path / "rgba.png")
    assert torch.equal(read_image(tmp_path / "rgba.png"), rgb)  # alpha dropped, not blended
    palette = np.array([[0, 0, 0], [200, 10, 30], [5, 250, 90]], dtype=np.uint8)
    indices = np.random.default_rng(0).integers(0, 3, (7, 9)).astype(np.uint8)
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.tobytes())
    paletted.save(tmp_path / "palette.png")
    want = torch.from_numpy(palette[indices]).permute(2, 0, 1)
    assert torch.equal(read_image(tmp_path / "palette.png"), want)


def test_encode_png_decodes_to_its_input():
    for pixels in (_pixels(3, seed=3), _pixels(1, seed=4)):
        with Image.open(io.BytesIO(encode_png(pixels))) as image:
            assert image.format == "PNG"
            decoded = torch.from_numpy(np.array(image)).reshape(7, 9, -1).permute(2, 0, 1)
        assert torch.equal(decoded, pixels)


# torchvision's decoder is the one being replaced: its deprecation warning is expected here.
@pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")
@pytest.mark.parametrize("gray", [False, True])
def test_jpeg_equals_torchvision_decode_jpeg(tmp_path, gray):
    from torchvision.io import ImageReadMode, decode_jpeg

    write_image(_pixels(3, seed=5, h=19, w=23), tmp_path / "a.jpg", quality=90)
    data = torch.frombuffer(bytearray((tmp_path / "a.jpg").read_bytes()), dtype=torch.uint8)
    want = decode_jpeg(data, mode=ImageReadMode.GRAY if gray else ImageReadMode.RGB)
    # Exactly equal, not within a level: both decode with libjpeg-turbo's default (islow
    # DCT, fancy upsampling), and gray is the decoder's own Y channel in both.
    assert torch.equal(read_image(tmp_path / "a.jpg", gray=gray), want)


def test_bad_files_are_errors_naming_them(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"image file .*missing\.png not found"):
        read_image(tmp_path / "missing.png")
    write_image(_pixels(3, seed=6), tmp_path / "whole.png")
    whole = (tmp_path / "whole.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(whole[:60])
    flipped = bytearray(whole)  # one byte of the compressed pixels flipped:
    flipped[whole.index(b"IDAT") + 20] ^= 0xFF  # torchvision 0.29's decode_image segfaults
    (tmp_path / "flipped.png").write_bytes(bytes(flipped))
    (tmp_path / "text.png").write_bytes(b"not a png")
    write_image(_pixels(3, seed=7), tmp_path / "a.gif")
    Image.fromarray(np.full((4, 4), 40000, dtype=np.uint16)).save(tmp_path / "deep.png")
    for name, reason in [
        ("cut.png", "truncated"),
        ("flipped.png", "broken data stream"),
        ("text.png", "cannot identify"),
        ("a.gif", "cannot identify"),  # only PNG and JPEG are read
        ("deep.png", "I;16 pixels, not 8 bits"),  # uint8 would clip 40000
    ]:
        path = tmp_path / name
        message = rf"{re.escape(str(path))} is not a readable PNG/JPEG image: .*{reason}"
        with pytest.raises(ValueError, match=message):
            read_image(path)


def test_encode_png_names_a_wrong_tensor():
    with pytest.raises(ValueError, match=r"uint8 \(1 or 3, H, W\) tensor, got torch.float32"):
        encode_png(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match=r"got torch.uint8 \(2, 4, 4\)"):
        encode_png(torch.zeros(2, 4, 4, dtype=torch.uint8))


def test_masks_are_gray_values_or_palette_indices_never_colours(tmp_path):
    indices = np.array([[0, 1, 2], [15, 20, 255]], dtype=np.uint8)
    # A VOC-style palette whose colours are not the indices: luma would be other numbers.
    voc = Image.fromarray(indices, mode="P")
    voc.putpalette([value for i in range(256) for value in (128, i, 255 - i)])
    voc.save(tmp_path / "voc.png")
    Image.fromarray(indices, mode="L").save(tmp_path / "gray.png")
    Image.fromarray(indices.astype(bool)).save(tmp_path / "bilevel.png")
    assert torch.equal(read_mask(tmp_path / "voc.png"), torch.from_numpy(indices))
    assert torch.equal(read_mask(tmp_path / "gray.png"), torch.from_numpy(indices))
    assert read_mask(tmp_path / "bilevel.png").tolist() == [[0, 1, 1], [1, 1, 1]]
    luma = read_image(tmp_path / "voc.png", gray=True)[0]
    assert not torch.equal(luma, read_mask(tmp_path / "voc.png"))  # the colours' gray differs
    Image.fromarray(np.zeros((2, 3, 3), dtype=np.uint8)).save(tmp_path / "rgb.png")
    with pytest.raises(ValueError, match=r"rgb\.png is not a readable mask PNG: RGB pixels"):
        read_mask(tmp_path / "rgb.png")
    with pytest.raises(FileNotFoundError, match=r"mask file .*missing\.png not found"):
        read_mask(tmp_path / "missing.png")
