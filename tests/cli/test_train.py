"""The main job: ``python -m functorch_diary train lenet`` on real digits, and its errors."""

import csv
import subprocess
import sys

from functorch_diary.cli import main
from tests.helpers import write_mnist


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
    assert "64 training and 16 test images" in capsys.readouterr().out
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
