"""``python -m functorch_diary style``: a 20-step run on 64x64 images, and its errors."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from functorch_diary.cli import main
from functorch_diary.cli import style as style_cli
from functorch_diary.zoo.style import VGG19Features


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m functorch_diary")
    style_cli.register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def files(tmp_path):
    """Random 64x64 content and style PNGs."""
    rng = np.random.default_rng(0)
    for name in ("content", "style"):
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{name}.png")
    return tmp_path


def test_cli_style_20_steps_writes_the_image(files, capsys):
    torch.manual_seed(0)  # the test's own random-weight VGG19 features file
    torch.save(VGG19Features().state_dict(), files / "vgg19.pth")
    out = files / "result" / "out.png"
    args = parse(
        ["style", "--content", str(files / "content.png"), "--style", str(files / "style.png"),
         "--weights", str(files / "vgg19.pth"), "--out", str(out), "--steps", "20", "--size", "64"]
    )  # fmt: skip
    assert args.run(args) == 0
    with Image.open(out) as image:
        assert image.size == (64, 64) and image.mode == "RGB"
        result = np.asarray(image)
    with Image.open(files / "content.png") as content:
        assert not np.array_equal(result, np.asarray(content))  # the image was optimised
    captured = capsys.readouterr()
    assert "after 20 adam steps" in captured.out
    assert "20/20" in captured.err  # the tqdm progress bar reached the end


def test_cli_style_missing_weights_names_the_file_and_how_to_get_it(files):
    args = parse(
        ["style", "--content", str(files / "content.png"), "--style", str(files / "style.png"),
         "--weights", str(files / "missing.pth"), "--out", str(files / "out.png")]
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"missing\.pth.*IMAGENET1K_V1") as error:
        args.run(args)
    assert "never downloads" in str(error.value)
    assert not (files / "out.png").exists()


def test_cli_style_missing_image_is_reported_before_loading_weights(files):
    args = parse(
        ["style", "--content", str(files / "nope.png"), "--style", str(files / "style.png"),
         "--weights", str(files / "missing.pth"), "--out", str(files / "out.png")]
    )  # fmt: skip
    with pytest.raises(FileNotFoundError, match=r"nope\.png"):
        args.run(args)


def _style_error(capsys, files, **paths) -> str:
    """Run ``style`` through ``main`` with some files replaced; assert a one-line exit 2."""
    argv = {"content": files / "content.png", "style": files / "style.png",
            "weights": files / "vgg19.pth", "out": files / "out.png", **paths}  # fmt: skip
    command = ["style", *(f for k, v in argv.items() for f in (f"--{k}", str(v)))]
    assert main([*command, "--steps", "1", "--size", "16", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    assert not (files / "out.png").exists()
    return err


def test_garbage_weights_file_is_one_line_naming_it(files, capsys):
    (files / "junk.pth").write_bytes(b"\x80\x02not really a pickle" * 50)
    err = _style_error(capsys, files, weights=files / "junk.pth")
    assert f"--weights {files / 'junk.pth'}" in err and "vgg19" in err


def test_weights_of_another_model_are_one_line_naming_the_key(files, capsys):
    torch.save(torch.nn.Linear(3, 2).state_dict(), files / "linear.pth")
    err = _style_error(capsys, files, weights=files / "linear.pth")
    assert f"--weights {files / 'linear.pth'}" in err and "missing 'features.0.weight'" in err


def test_content_that_is_not_an_image_is_one_line_naming_it(files, capsys):
    torch.manual_seed(0)
    torch.save(VGG19Features().state_dict(), files / "vgg19.pth")
    (files / "notes.png").write_text("not an image")
    err = _style_error(capsys, files, content=files / "notes.png")
    assert f"--content {files / 'notes.png'}" in err and "cannot identify image" in err


def test_zero_steps_is_refused(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["style", "--content", "a", "--style", "b", "--weights", "c", "--out", "d.png",
              "--steps", "0"])  # fmt: skip
    assert exit_info.value.code == 2
    assert "argument --steps" in capsys.readouterr().err
