"""``train unet | deeplab | deeplab-bn | yolo``: a short run lowers the loss and writes its
run folder with its prediction picture; each training batch's augmentation equals
torchvision.transforms.v2 with the same drawn parameters, masks and boxes included."""

import csv
from dataclasses import replace
from functools import partial

import pytest
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import InterpolationMode, v2
from torchvision.transforms.v2 import functional as TF

from functorch_diary import prng
from functorch_diary.cli import main
from functorch_diary.cli.recipes import RECIPES
from functorch_diary.cli.recipes.vision import (
    augment_detection,
    augment_segmentation,
    load_detection_data,
)
from functorch_diary.data import augment
from functorch_diary.data.synthetic import segmentation_set
from functorch_diary.testing import assert_trees_close
from tests.helpers import write_image


def _write_folder(root, n, seed):
    """A segmentation folder (images/ + masks/ PNGs) cut from the synthetic set."""
    data = segmentation_set(n, 32, seed=seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        write_image((data.images[i] * 255).round().byte(), root / "images" / f"{i:03d}.png")
        write_image(data.masks[i][None].byte(), root / "masks" / f"{i:03d}.png")


def _png_shape(path):
    with Image.open(path) as image:
        return (len(image.getbands()), image.height, image.width)


def _run(tmp_path, recipe, *extra):
    out = tmp_path / "run"
    args = ["train", recipe, "--epochs", "3", "--batch-size", "16", "--out", str(out)]
    assert main([*args, "--no-progress", *extra]) == 0
    with open(out / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[-1]["train_loss"]) < float(rows[0]["train_loss"])
    assert (out / "metrics.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "checkpoints").iterdir())[-1] == "epoch-000003.ckpt"
    return out, rows


@pytest.mark.parametrize("recipe", ["unet", "deeplab", "deeplab-bn"])
def test_segmentation_recipe_short_run(tmp_path, capsys, recipe):
    _write_folder(tmp_path / "data" / "train", 24, seed=0)
    _write_folder(tmp_path / "data" / "test", 4, seed=1)
    out, rows = _run(tmp_path, recipe, "--data-dir", str(tmp_path / "data"))
    assert 0.0 <= float(rows[-1]["val_miou"]) <= 1.0
    # Two rows (truth, prediction) of the four 32x32 test images enlarged 4 times, with
    # make_grid's 2-pixel padding around each tile.
    assert _png_shape(out / "predictions.png") == (3, 2 * 130 + 2, 4 * 130 + 2)
    # evaluate draws the same picture from the run's best checkpoint.
    picture = tmp_path / "best.png"
    assert main(["evaluate", str(out), "--predictions", str(picture)]) == 0
    assert _png_shape(picture) == (3, 2 * 130 + 2, 4 * 130 + 2)
    missing = tmp_path / "missing" / "best.png"
    assert main(["evaluate", str(out), "--predictions", str(missing)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(missing) in err and "No such file" in err


def test_yolo_recipe_short_run(tmp_path, monkeypatch):
    small = partial(load_detection_data, n_train=24, n_test=4)
    monkeypatch.setitem(RECIPES, "yolo", replace(RECIPES["yolo"], load_data=small))
    out, rows = _run(tmp_path, "yolo")
    assert 0.0 <= float(rows[-1]["val_map50"]) <= 1.0
    # One row of the four 64x64 test images (enlarged twice) with their true and
    # predicted boxes.
    assert _png_shape(out / "predictions.png") == (3, 128 + 4, 4 * 130 + 2)


# ---- each batch's augmentation, against torchvision.transforms.v2 ----

KEY = prng.key(5)


def _jitter(image, factors, i):
    b, c, s = (float(f[i]) for f in factors)
    return TF.adjust_saturation(TF.adjust_contrast(TF.adjust_brightness(image, b), c), s)


def test_segmentation_augmentation_moves_the_masks_with_the_pixels():
    images, masks = segmentation_set(6, 32, seed=3)
    images = images.double()  # float64: the comparison is tight
    ours = augment_segmentation(images, masks, KEY)
    # The parameters the recipe's pipeline draws: one key per transform, in order; the
    # zoom and rotation, applied to half the images, split their key again.
    zoom_key = prng.fold_in(prng.fold_in(KEY, 0), 1)
    zoomed = augment.draw_flip(prng.fold_in(prng.fold_in(KEY, 0), 0), 6)
    crop = augment.draw_resized_crop(prng.fold_in(zoom_key, 0), 6, (32, 32), scale=(0.5, 1.0))
    angle = augment.draw_rotation(prng.fold_in(zoom_key, 1), 6, 20.0)
    hflip, vflip = (augment.draw_flip(prng.fold_in(KEY, k), 6) for k in (1, 2))
    jitter = augment.draw_color_jitter(prng.fold_in(KEY, 3), 6, 0.3, 0.3, 0.3)
    assert all(0 < int(chosen.sum()) < 6 for chosen in (zoomed, hflip, vflip))
    for i in range(6):

        def geometry(x, i=i):
            if zoomed[i]:
                x = TF.resized_crop(x, *(int(p[i]) for p in crop), [32, 32],
                                    InterpolationMode.BILINEAR, antialias=False)  # fmt: skip
                x = TF.rotate(x, float(angle[i]), InterpolationMode.BILINEAR)
            x = TF.horizontal_flip(x) if hflip[i] else x
            return TF.vertical_flip(x) if vflip[i] else x

        image, mask = geometry(tv_tensors.Image(images[i])), geometry(tv_tensors.Mask(masks[i]))
        assert_trees_close(ours[0][i], _jitter(image, jitter, i).as_subclass(torch.Tensor),
                           rtol=0, atol=1e-12)  # fmt: skip
        assert torch.equal(ours[1][i], mask.as_subclass(torch.Tensor))


def test_detection_augmentation_moves_clamps_and_drops_boxes_as_torchvision():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, 64, 64, generator=g, dtype=torch.float64)
    # Boxes at the borders, which a 6-pixel shift cuts or pushes out, one in the middle,
    # and a padding slot.
    boxes = torch.tensor([[0.0, 10.0, 4.0, 20.0], [59.0, 0.0, 64.0, 3.0],
                          [20.0, 20.0, 40.0, 44.0], [0.0, 0.0, 0.0, 0.0]],
                         dtype=torch.float64).expand(6, 4, 4)  # fmt: skip
    labels = torch.tensor([0, 1, 2, -1]).expand(6, 4)
    targets = torch.cat([boxes, labels[..., None].double()], dim=-1)
    ours_images, ours_targets = augment_detection(images, targets, KEY)
    assert ours_targets.shape == targets.shape
    top, left = augment.draw_pad_crop(prng.fold_in(KEY, 0), 6, 6)
    hflip, vflip = (augment.draw_flip(prng.fold_in(KEY, k), 6) for k in (1, 2))
    jitter = augment.draw_color_jitter(prng.fold_in(KEY, 3), 6, 0.3, 0.3, 0.3)
    dropped = 0
    for i in range(6):

        def geometry(x, i=i):
            x = TF.crop(TF.pad(x, [6]), int(top[i]), int(left[i]), 64, 64)
            x = TF.horizontal_flip(x) if hflip[i] else x
            return TF.vertical_flip(x) if vflip[i] else x

        image = geometry(tv_tensors.Image(images[i]))
        box = geometry(tv_tensors.BoundingBoxes(boxes[i, :3], format="XYXY", canvas_size=(64, 64)))
        theirs = v2.SanitizeBoundingBoxes()(
            {"image": _jitter(image, jitter, i), "boxes": box, "labels": labels[i, :3]}
        )
        real = ours_targets[i, :, 4] >= 0
        assert_trees_close(ours_images[i], theirs["image"].as_subclass(torch.Tensor),
                           rtol=0, atol=1e-12)  # fmt: skip
        assert_trees_close(ours_targets[i, real, :4], theirs["boxes"].as_subclass(torch.Tensor),
                           rtol=0, atol=1e-12)  # fmt: skip
        assert torch.equal(ours_targets[i, real, 4].long(), theirs["labels"])
        assert not ours_targets[i, ~real, :4].any()  # a dropped box is a padding slot
        dropped += 3 - len(theirs["labels"])
    assert dropped > 0  # some shift pushed a border box out of the image
