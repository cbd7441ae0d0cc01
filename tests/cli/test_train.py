"""The main job: ``python -m functorch_diary train lenet`` on real digits, and its errors."""

import csv
import os
import pickle
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from functorch_diary.cli import main
from functorch_diary.tree import tree_leaves
from tests.helpers import write_cifar, write_idx, write_mnist


def test_main_job_reaches_95_percent_on_held_out_digits(capsys):
    """The README's main command, in full (about 10 s on 2 idle cores)."""
    assert main(["train", "lenet", "--no-progress"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("test accuracy: ")[1].split()[0])
    assert accuracy >= 0.95, out


def test_train_reads_mnist_idx_from_data_dir_and_writes_metrics(tmp_path, capsys):
    write_mnist(tmp_path / "mnist", n_train=64, n_test=16)
    code = main(
        [
            "train",
            "mlp",
            "--data-dir",
            str(tmp_path / "mnist"),
            "--epochs",
            "2",
            "--batch-size",
            "16",
            "--out",
            str(tmp_path / "run"),
            "--no-progress",
        ]
    )
    assert code == 0
    # 64 training images: 6 (10%) held out for validation, the test split untouched.
    assert "58 training, 6 validation and 16 test images" in capsys.readouterr().out
    with open(tmp_path / "run" / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1", "2"]


def test_missing_data_dir_is_a_clear_error_not_a_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "functorch_diary", "train", "lenet", "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "train-images-idx3-ubyte" in result.stderr and "Traceback" not in result.stderr


# ---- bad options: refused by argparse before anything is read, in one line ----


def _usage_error(capsys, argv) -> str:
    """Run ``argv``; assert argparse refused it with exit 2 and one stderr line; return it."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    ("option", "value", "expected"),
    [
        ("--epochs", "0", "at least 1"),
        ("--epochs", "-1", "at least 1"),
        ("--batch-size", "0", "at least 1"),
        ("--batch-size", "-5", "at least 1"),
        ("--lr", "-0.1", ">= 0"),
        ("--lr", "nan", "finite"),
        ("--epochs", "two", "must be an integer"),
        ("--seed", "-3", "0 or more"),
        ("--device", "cuda:99", "cuda:99"),
        ("--device", "gpu", "not a torch device"),
    ],
)
def test_out_of_range_options_are_refused_naming_the_option(capsys, option, value, expected):
    err = _usage_error(capsys, ["train", "lenet", option, value])
    assert f"argument {option}" in err and expected in err, err


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU: cuda is valid")
def test_cuda_without_a_gpu_says_so_and_what_to_use(capsys):
    err = _usage_error(capsys, ["train", "lenet", "--device", "cuda"])
    assert "no CUDA GPU" in err and "--device cpu" in err


def test_out_inside_a_regular_file_is_refused_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    err = _usage_error(capsys, ["train", "lenet", "--out", str(tmp_path / "file" / "run")])
    assert "--out" in err and str(tmp_path / "file") in err and "is a file" in err


def test_zero_is_a_value_lr_0_is_used_as_given(tmp_path, capsys):
    write_mnist(tmp_path, n_train=32, n_test=8)
    argv = ["train", "logreg", "--data-dir", str(tmp_path), "--epochs", "1", "--batch-size",
            "16", "--lr", "0", "--no-progress"]  # fmt: skip
    assert main(argv) == 0
    assert "lr 0.0," in capsys.readouterr().out


def test_a_batch_larger_than_the_data_is_refused_not_a_nan_run(tmp_path, capsys):
    write_mnist(tmp_path, n_train=20, n_test=8)  # 18 to train on, 2 held out to validate
    argv = ["train", "mlp", "--data-dir", str(tmp_path), "--batch-size", "64", "--no-progress"]
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "nan" not in captured.out
    err = captured.err
    assert err.count("\n") == 1 and "--batch-size 64" in err and "18 training images" in err


# ---- damaged or hostile data files: one line naming the file, exit 2 ----


def _data_error(capsys, recipe, data_dir) -> str:
    assert main(["train", recipe, "--data-dir", str(data_dir), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _garbage(path):
    path.write_bytes(bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)))


def _truncate(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _malicious(path):
    with open(path, "wb") as handle:
        pickle.dump({b"data": _RunsCode(), b"labels": []}, handle, protocol=2)


@pytest.mark.parametrize("damage", [_garbage, _truncate, _malicious])
def test_damaged_cifar_batch_is_one_line_naming_the_file(tmp_path, capsys, damage):
    write_cifar(tmp_path, per_batch=4, n_test=4)
    damage(tmp_path / "data_batch_3")
    err = _data_error(capsys, "resnet", tmp_path)
    assert str(tmp_path / "data_batch_3") in err and "--data-dir" in err


@pytest.mark.parametrize("gz", [False, True])
def test_truncated_mnist_file_is_one_line_naming_the_file(tmp_path, capsys, gz):
    write_mnist(tmp_path, gz=gz)
    name = "t10k-images-idx3-ubyte" + (".gz" if gz else "")
    _truncate(tmp_path / name)
    err = _data_error(capsys, "lenet", tmp_path)
    assert str(tmp_path / name) in err and "truncated" in err


def test_bad_idx_magic_is_one_line_naming_the_file(tmp_path, capsys):
    write_mnist(tmp_path)
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])  # an images magic
    err = _data_error(capsys, "lenet", tmp_path)
    assert str(path) in err and "bad header" in err


def test_label_count_mismatch_is_one_line_naming_both_files(tmp_path, capsys):
    write_mnist(tmp_path, n_train=20)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
    err = _data_error(capsys, "lenet", tmp_path)
    assert "20 images" in err and "19 labels" in err and "train-labels-idx1-ubyte" in err


# ---- checkpoints, resume, evaluate, export ----


def _run_dir(tmp_path, name, *extra):
    """A 3-epoch MLP run on small IDX files, into tmp_path/name; returns the folder."""
    data = tmp_path / "mnist"
    if not data.exists():
        write_mnist(data, n_train=40, n_test=16)
    out = tmp_path / name
    argv = ["train", "mlp", "--data-dir", str(data), "--epochs", "3", "--batch-size", "12",
            "--seed", "3", "--out", str(out), "--keep", "0", "--no-progress", *extra]  # fmt: skip
    assert main(argv) == 0
    return out


def _final_state(out):
    from functorch_diary.cli.runs import restore

    _, ts, _ = restore("checkpoint", out / "checkpoints" / "epoch-000003.ckpt", "cpu")
    return ts


def _rows(out):
    with open(out / "metrics.csv") as handle:
        return [{k: v for k, v in row.items() if k not in ("seconds", "samples_per_second")}
                for row in csv.DictReader(handle)]  # fmt: skip


def test_interrupted_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(tmp_path, capsys):
    whole = _run_dir(tmp_path, "whole")
    # What a run killed after epoch 1's checkpoint leaves: that checkpoint (saves are
    # atomic) and logs that may run past it (here: the CSV rows and TensorBoard events of
    # epochs 2 and 3, which the resumed run must replace, not repeat).
    cut = tmp_path / "cut"
    shutil.copytree(whole, cut)
    for epoch in (2, 3):
        (cut / "checkpoints" / f"epoch-00000{epoch}.ckpt").unlink()
    capsys.readouterr()
    assert main(["train", "--resume", str(cut), "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    want, got = _final_state(whole), _final_state(cut)
    for name, value in want.params.items():
        assert torch.equal(got.params[name], value), name
    for a, b in zip(tree_leaves(got), tree_leaves(want), strict=True):
        assert torch.equal(a, b)
    assert _rows(cut) == _rows(whole)  # the log restarts from the checkpoint's history
    assert (cut / "metrics.png").stat().st_size > 0


def test_resume_with_other_settings_or_a_damaged_checkpoint_is_one_line(tmp_path, capsys):
    out = _run_dir(tmp_path, "run")
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--batch-size", "4"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--batch-size 4 differs" in err
    last = out / "checkpoints" / "epoch-000003.ckpt"
    last.write_bytes(last.read_bytes()[:-100])
    assert main(["train", "--resume", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(last) in err and "Traceback" not in err


def test_run_writes_csv_tensorboard_plot_and_evaluate_prints_test_metrics(tmp_path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _run_dir(tmp_path, "run", "--log-every", "1")
    trained = capsys.readouterr().out
    assert [row["epoch"] for row in _rows(out)] == ["1", "2", "3"]
    assert {"lr", "val_accuracy", "val_loss", "train_loss"} <= set(_rows(out)[0])
    with open(out / "steps.csv") as handle:
        assert len(list(csv.DictReader(handle))) == 9  # 36 training images / 12, 3 epochs
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert len(events.Scalars("epoch/lr")) == 3 and len(events.Scalars("step/train_loss")) == 9
    assert (out / "metrics.png").read_bytes()[:4] == b"\x89PNG"
    last = out / "checkpoints" / "epoch-000003.ckpt"
    assert main(["evaluate", str(last)]) == 0
    evaluated = capsys.readouterr().out
    accuracy = trained.split("test accuracy: ")[1].split()[0]
    assert f"test accuracy {accuracy}" in evaluated and "16 test images" in evaluated
    # A classifier draws no prediction picture: train wrote none, evaluate refuses to.
    assert not (out / "predictions.png").exists()
    assert main(["evaluate", str(last), "--predictions", str(tmp_path / "p.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "the mlp recipe draws no prediction picture" in err
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_export_gives_a_state_dict_the_module_twin_loads_with_the_same_logits(tmp_path, suffix):
    from functorch_diary.zoo.models.mlp import MLP

    out = _run_dir(tmp_path, "run")
    last = out / "checkpoints" / "epoch-000003.ckpt"
    target = tmp_path / f"model{suffix}"
    assert main(["export", str(last), "--out", str(target)]) == 0
    if suffix == ".pt":
        state_dict = torch.load(target, weights_only=True)
    else:
        from safetensors.torch import load_file

        state_dict = load_file(target)
    net = MLP()
    net.load_state_dict(state_dict)  # strict: exactly the module's keys and shapes
    ts = _final_state(out)
    x = torch.rand(5, 1, 28, 28)
    from functorch_diary.zoo.models import mlp

    want, _ = mlp().apply(ts.params, ts.state, x)
    with torch.no_grad():
        assert torch.equal(net.eval()(x), want)


# ---- the program itself ----


def test_the_console_script_and_the_module_print_their_own_names(capsys):
    from functorch_diary.cli import build_parser
    from functorch_diary.cli.args import prog_name

    assert prog_name("/venv/bin/functorch-diary") == "functorch-diary"
    assert prog_name("/repo/functorch_diary/__main__.py") == "python -m functorch_diary"
    with pytest.raises(SystemExit):
        build_parser("functorch-diary").parse_args(["--help"])
    assert capsys.readouterr().out.startswith("usage: functorch-diary ")


def test_version_is_the_installed_distributions(capsys):
    from importlib import metadata

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.split()[-1] == metadata.version("functorch-diary")


def test_debug_shows_the_traceback_of_a_reported_failure(tmp_path):
    from functorch_diary.cli.errors import CliError

    write_mnist(tmp_path, n_train=4)
    with pytest.raises(CliError, match="--batch-size 64 is larger"):
        main(["train", "mlp", "--data-dir", str(tmp_path), "--batch-size", "64", "--debug"])
