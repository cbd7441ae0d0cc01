"""Metric writers for :func:`~functorch_diary.training.fit.fit`: CSV, TensorBoard, a plot.

Both loggers are callbacks (see :mod:`.callbacks`): called after each epoch, and through
``on_step`` every ``log_every`` steps, they write the record as it comes (an
interrupted run leaves its log up to the last epoch) and decide nothing. Given the
history of a resumed run, they start from it: the CSV file is rewritten with those
rows, and TensorBoard drops the events past the resumed step (``purge_step``), so a
log never shows an epoch twice. TensorBoard and matplotlib are imported when first
used, not with the package.

Example:
    >>> import csv, os, tempfile
    >>> folder = tempfile.mkdtemp()
    >>> log = CsvLogger(os.path.join(folder, "metrics.csv"))
    >>> log(None, {"epoch": 1, "train_loss": 0.5}, [{"epoch": 1, "train_loss": 0.5}])
    >>> list(csv.DictReader(open(os.path.join(folder, "metrics.csv"))))
    [{'epoch': '1', 'train_loss': '0.5'}]
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from .fit import Record
from .step import TrainState

__all__ = ["CsvLogger", "TensorBoard", "plot_history"]


class _CsvFile:
    """A CSV file written one row at a time, flushed after each, header from row one."""

    def __init__(self, path: Path, rows: Sequence[Mapping[str, float]]) -> None:
        self.path, self.fields = path, None
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("")  # a resumed run restarts the file from its history
        for row in rows:
            self.write(row)

    def write(self, row: Mapping[str, float]) -> None:
        with open(self.path, "a", newline="") as handle:
            if self.fields is None:
                self.fields = list(row)
                csv.DictWriter(handle, self.fields).writeheader()
            csv.DictWriter(handle, self.fields, extrasaction="ignore").writerow(row)


class CsvLogger:
    """Epoch records to ``path`` and, with ``steps_path``, step records there.

    Args:
        path: the epoch CSV (columns: the first record's keys).
        steps_path: the step CSV, or ``None``.
        history: records of the run so far (a resumed run), written first.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        steps_path: str | os.PathLike[str] | None = None,
        history: Sequence[Record] = (),
    ) -> None:
        self.epochs = _CsvFile(Path(path), history)
        self.steps = None if steps_path is None else _CsvFile(Path(steps_path), ())

    def __call__(
        self, ts: TrainState | None, metrics: Mapping[str, float], history: Sequence[Record]
    ) -> None:
        self.epochs.write(metrics)

    def on_step(self, ts: TrainState | None, metrics: Mapping[str, float]) -> None:
        if self.steps is not None:
            self.steps.write(metrics)


class TensorBoard:
    """Scalars to TensorBoard event files in ``log_dir``: ``epoch/<key>`` per epoch and
    ``step/<key>`` per logging step, against the global step (``tensorboard --logdir``).

    Args:
        log_dir: the event files' folder.
        purge_step: drop events at or past this step (a resumed run's step), or ``None``.
    """

    def __init__(self, log_dir: str | os.PathLike[str], purge_step: int | None = None) -> None:
        from torch.utils.tensorboard import SummaryWriter  # heavy: imported when used

        self.writer = SummaryWriter(os.fspath(log_dir), purge_step=purge_step)

    def _write(self, prefix: str, metrics: Mapping[str, float]) -> None:
        step = int(metrics["step"])
        for key, value in metrics.items():
            if key != "step":
                self.writer.add_scalar(f"{prefix}/{key}", value, step)
        self.writer.flush()  # readable while the run goes on, and after a kill

    def __call__(
        self, ts: TrainState | None, metrics: Mapping[str, float], history: Sequence[Record]
    ) -> None:
        self._write("epoch", metrics)

    def on_step(self, ts: TrainState | None, metrics: Mapping[str, float]) -> None:
        self._write("step", metrics)

    def on_end(self, ts: TrainState | None, history: Sequence[Record]) -> None:
        self.writer.close()


def plot_history(history: Sequence[Record], path: str | os.PathLike[str]) -> None:
    """Write a PNG: training and validation loss (left), validation accuracy (right),
    against the epoch."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    from matplotlib import pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in (("train_loss", "train"), ("val_loss", "validation")):
        if any(key in h for h in history):
            loss_ax.plot(epochs, [h.get(key, float("nan")) for h in history], label=label)
    loss_ax.set(xlabel="epoch", ylabel="loss", title="loss")
    loss_ax.legend()
    accuracy = [h.get("val_accuracy", float("nan")) for h in history]
    acc_ax.plot(epochs, accuracy, color="tab:green")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title="validation accuracy")
    fig.tight_layout()
    fig.savefig(os.fspath(path), dpi=100)
    plt.close(fig)
