"""``python -m functorch_diary gan ...``: outputs, checkpoints, bit-for-bit resume, validation."""

from __future__ import annotations

import csv
import math
import shutil

import pytest
from PIL import Image

from functorch_diary import checkpoint
from functorch_diary.cli import gan as gan_cli
from functorch_diary.cli import main
from functorch_diary.testing import assert_trees_close

TINY = ["--batch-size", "4", "--width", "2", "--latent-dim", "4", "--no-progress"]


def _events(folder):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = EventAccumulator(str(folder / "tensorboard"))
    board.Reload()
    return board


def _rows(folder) -> list[dict[str, str]]:
    with open(folder / "metrics.csv") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.parametrize(
    ("variant", "metrics"),
    [
        ("wgan", ["critic_loss", "generator_loss"]),
        ("wgan-gp", ["critic_loss", "generator_loss", "gradient_penalty"]),
        ("sngan", ["critic_loss", "generator_loss"]),
    ],
)
def test_short_run_writes_samples_metrics_and_checkpoints(variant, metrics, tmp_path, capsys):
    out = tmp_path / variant
    assert main(["gan", variant, "--steps", "3", "--n-critic", "2", "--out", str(out), *TINY]) == 0
    # 64 samples of 28x28 in an 8x8 grid with 2-pixel padding, each pixel drawn 3x3.
    assert Image.open(out / "samples.png").size == (3 * (8 * 30 + 2),) * 2
    assert Image.open(out / "metrics.png").size[0] > 500
    rows = _rows(out)
    assert list(rows[0]) == ["step", *metrics]
    assert [int(r["step"]) for r in rows] == [0, 1, 2]
    assert all(math.isfinite(float(r[k])) for r in rows for k in metrics)
    # The run ends with a checkpoint of both networks, the loop's RNG and the metrics.
    [last] = gan_cli.checkpoints(out)
    meta = checkpoint.read_metadata(last)
    assert last.name == "step_00000003.ckpt" and meta["step"] == 3
    assert meta["config"]["variant"] == variant and meta["config"]["width"] == 2
    gs, _, _ = gan_cli.load_run(last)
    assert int(gs.generator.step) == 3 and int(gs.critic.step) == 3 * 2
    assert "step 3:" in capsys.readouterr().out
    # The same metrics as TensorBoard scalars, read back with tensorboard's own reader.
    board = _events(out)
    assert sorted(board.Tags()["scalars"]) == sorted(f"step/{m}" for m in metrics)
    assert [e.step for e in board.Scalars("step/critic_loss")] == [0, 1, 2]
    assert board.Scalars("step/generator_loss")[2].value == pytest.approx(
        float(rows[2]["generator_loss"]), rel=1e-6
    )


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    argv = ["gan", "wgan-gp", "--steps", "4", "--n-critic", "2", "--checkpoint-every", "2"]
    assert main([*argv, "--keep", "3", "--out", str(whole), *TINY]) == 0
    assert [p.name for p in gan_cli.checkpoints(whole)] == [
        "step_00000002.ckpt",
        "step_00000004.ckpt",
    ]
    # A crash after step 3: the folder holds the step-2 checkpoint and 3 rows of metrics.
    shutil.copytree(whole, cut)
    (cut / "checkpoints" / "step_00000004.ckpt").unlink()
    with open(cut / "metrics.csv") as handle:
        lines = handle.readlines()[:4]
    (cut / "metrics.csv").write_text("".join(lines))
    assert main(["gan", "wgan-gp", "--steps", "4", "--resume", str(cut), "--no-progress"]) == 0
    resumed, _, _ = gan_cli.load_run(gan_cli.checkpoints(cut)[-1])
    expected, _, _ = gan_cli.load_run(gan_cli.checkpoints(whole)[-1])
    assert_trees_close(resumed, expected)  # bit for bit
    assert (cut / "metrics.csv").read_text() == (whole / "metrics.csv").read_text()
    # TensorBoard: the resumed steps replace the crashed run's events, none twice.
    steps = [e.step for e in _events(cut).Scalars("step/gradient_penalty")]
    assert steps == [0, 1, 2, 3]
    # A longer --steps continues the same run.
    assert main(["gan", "wgan-gp", "--steps", "5", "--resume", str(cut), "--no-progress"]) == 0
    assert [int(r["step"]) for r in _rows(cut)] == [0, 1, 2, 3, 4]


def test_resume_refuses_another_run_in_one_line(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["gan", "sngan", "--steps", "1", "--out", str(out), *TINY]) == 0
    capsys.readouterr()
    cases = [
        (["gan", "wgan", "--resume", str(out)], "holds a sngan run, not wgan"),
        (["gan", "sngan", "--width", "3", "--resume", str(out)], "--width 3 differs"),
        (["gan", "sngan", "--resume", str(tmp_path / "empty")], "no checkpoints"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert ": error: " in err and message in err and err.count("\n") == 1


COUNTS = ["--steps", "--batch-size", "--width", "--latent-dim", "--n-critic", "--keep"]
COUNTS += ["--checkpoint-every"]


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [(option, value, "must be a positive integer") for option in COUNTS for value in ("0", "-3")]
    + [("--steps", "two", "must be an integer")]
    + [("--seed", "-1", "must be 0 or more")]
    + [("--lr", value, "must be a finite number >= 0") for value in ("-0.001", "nan", "inf")],
)
def test_bad_options_are_refused_in_one_line(option, value, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["gan", "wgan", option, value, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option}: {message}" in err and err.count("\n") == 1
    assert not (tmp_path / "metrics.csv").exists()


def test_help_says_what_each_gan_is(capsys):
    with pytest.raises(SystemExit):
        main(["gan", "--help"])
    text = capsys.readouterr().out
    for words in ("weights clipped", "gradient penalty", "spectrally normalised", "hinge"):
        assert words in text
    assert "seed 0" not in text.lower() and "day 6" not in text.lower()


def test_image_size_32_and_unknown_variant(tmp_path):
    argv = ["gan", "sngan", "--steps", "1", "--image-size", "32", "--out", str(tmp_path), *TINY]
    assert main(argv) == 0
    assert Image.open(tmp_path / "samples.png").size == (3 * (8 * 34 + 2),) * 2
    with pytest.raises(SystemExit):
        main(["gan", "dcgan"])


def test_ema_generator_is_torch_s_averaged_model_of_the_trained_one(tmp_path):
    """--ema keeps AveragedModel(get_ema_multi_avg_fn(decay), use_buffers=True) of the
    generator, resumes with it and samples from it; the torch twin replays the run's
    checkpointed generators."""
    from torch.optim import swa_utils

    out = tmp_path / "run"
    argv = ["gan", "sngan", "--steps", "3", "--ema", "0.8", "--checkpoint-every", "1"]
    assert main([*argv, "--keep", "5", "--out", str(out), *TINY]) == 0
    assert (out / "samples_ema.png").exists()
    states = [gan_cli.load_run(path)[0] for path in gan_cli.checkpoints(out)]
    generator = gan_cli.load_run(gan_cli.checkpoints(out)[0])[2]
    module = generator.factory()
    twin = swa_utils.AveragedModel(
        module, multi_avg_fn=swa_utils.get_ema_multi_avg_fn(0.8), use_buffers=True
    )
    for gs in states:
        module.load_state_dict(generator.state_dict(gs.generator.params, gs.generator.state))
        twin.update_parameters(module)
    final = gan_cli.load_run_with_average(gan_cli.checkpoints(out)[-1])[3]
    want = dict(twin.module.state_dict())
    got = {**final.params, **final.state}
    assert_trees_close(got, {k: want[k] for k in got}, rtol=1e-6, atol=1e-7)
    assert int(final.n_averaged) == 3
