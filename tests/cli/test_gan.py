"""``python -m functorch_diary gan ...``: a short run of each variant writes its files."""

from __future__ import annotations

import argparse
import csv
import math

import pytest
from PIL import Image

from functorch_diary.cli import gan as gan_cli


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    gan_cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


@pytest.mark.parametrize("variant", ["wgan", "wgan-gp", "sngan"])
def test_short_run_writes_samples_and_loss_plot(variant, tmp_path, capsys):
    out = tmp_path / variant
    argv = ["gan", variant, "--steps", "3", "--n-critic", "2", "--batch-size", "8"]
    argv += ["--width", "4", "--latent-dim", "8", "--out", str(out), "--no-progress"]
    assert _run(argv) == 0
    grid = Image.open(out / "samples.png")
    # 64 samples of 28x28 in an 8x8 grid with torchvision's 2-pixel padding.
    assert grid.size == (8 * 30 + 2, 8 * 30 + 2)
    assert Image.open(out / "losses.png").size[0] > 100
    with open(out / "losses.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(math.isfinite(float(r[k])) for r in rows for k in ("critic_loss", "generator_loss"))
    assert "wrote" in capsys.readouterr().out


def test_image_size_32_and_unknown_variant(tmp_path):
    argv = ["gan", "sngan", "--steps", "1", "--batch-size", "4", "--width", "2"]
    argv += ["--latent-dim", "4", "--image-size", "32", "--out", str(tmp_path), "--no-progress"]
    assert _run(argv) == 0
    assert Image.open(tmp_path / "samples.png").size == (8 * 34 + 2, 8 * 34 + 2)
    with pytest.raises(SystemExit):
        _run(["gan", "dcgan"])
