"""``train unet | deeplab | deeplab-bn | yolo``: a short run lowers the loss and writes its
run folder, and the trained state draws its prediction picture."""

import csv
from dataclasses import replace
from functools import partial

import pytest
import torch
from torchvision.io import decode_png, write_png

from functorch_diary.cli import main
from functorch_diary.cli.recipes import RECIPES
from functorch_diary.cli.recipes.vision import draw_predictions, load_detection_data
from functorch_diary.cli.runs import find_checkpoint, restore
from functorch_diary.data.synthetic import segmentation_set


def _write_folder(root, n, seed):
    """A segmentation folder (images/ + masks/ PNGs) cut from the synthetic set."""
    data = segmentation_set(n, 32, seed=seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n):
        write_png((data.images[i] * 255).round().byte(), str(root / "images" / f"{i:03d}.png"))
        write_png(data.masks[i][None].byte(), str(root / "masks" / f"{i:03d}.png"))


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
def test_segmentation_recipe_short_run(tmp_path, recipe):
    _write_folder(tmp_path / "data" / "train", 24, seed=0)
    _write_folder(tmp_path / "data" / "test", 4, seed=1)
    out, rows = _run(tmp_path, recipe, "--data-dir", str(tmp_path / "data"))
    assert 0.0 <= float(rows[-1]["val_miou"]) <= 1.0
    _, ts, _ = restore("--resume", find_checkpoint("--resume", out), "cpu")
    images, masks = segmentation_set(3, 32, seed=2)
    picture = draw_predictions(recipe, ts, images, masks)
    write_png(picture, str(tmp_path / "predictions.png"))
    # Two rows (truth, prediction) of three 32x32 tiles with make_grid's 2-pixel padding.
    assert decode_png(torch.frombuffer(bytearray((tmp_path / "predictions.png").read_bytes()),
                      dtype=torch.uint8)).shape == (3, 2 * 34 + 2, 3 * 34 + 2)  # fmt: skip


def test_yolo_recipe_short_run(tmp_path, monkeypatch):
    small = partial(load_detection_data, n_train=24, n_test=4)
    monkeypatch.setitem(RECIPES, "yolo", replace(RECIPES["yolo"], load_data=small))
    out, rows = _run(tmp_path, "yolo")
    assert 0.0 <= float(rows[-1]["val_map50"]) <= 1.0
    _, ts, _ = restore("--resume", find_checkpoint("--resume", out), "cpu")
    split = small(None)
    picture = draw_predictions("yolo", ts, split.x_test[:2], split.y_test[:2])
    assert picture.shape == (3, 64 + 4, 2 * 66 + 2) and picture.dtype == torch.uint8
