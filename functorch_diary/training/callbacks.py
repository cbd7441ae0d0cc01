"""Callbacks for :func:`~functorch_diary.training.fit.fit`: early stopping, checkpoints.

A callback is called after each epoch as ``callback(ts, metrics, history)`` and returns
a :class:`~functorch_diary.training.fit.Decision` or ``None``. These two are pure
functions of their arguments and their settings: early stopping reads the history it is
given instead of counting epochs in an attribute, so a resumed run (whose history comes
from the checkpoint) decides exactly as the uninterrupted one would. Writing files is
their only effect; the state passed in is never changed.

==========================  ===================================  ===========================
here                        Keras                                Lightning
==========================  ===================================  ===========================
``EarlyStopping``           ``callbacks.EarlyStopping``          ``callbacks.EarlyStopping``
``Checkpoint``              ``callbacks.ModelCheckpoint``        ``callbacks.ModelCheckpoint``
``loggers.CsvLogger``       ``callbacks.CSVLogger``              ``loggers.CSVLogger``
``loggers.TensorBoard``     ``callbacks.TensorBoard``            ``loggers.TensorBoardLogger``
==========================  ===================================  ===========================

Example:
    >>> stop = EarlyStopping("val_loss", mode="min", patience=2)
    >>> history = [{"epoch": 1, "val_loss": 1.0}, {"epoch": 2, "val_loss": 1.1},
    ...            {"epoch": 3, "val_loss": 1.2}]
    >>> stop(None, history[1], history[:2]) is None, stop(None, history[2], history).stop
    (True, True)
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from .checkpointing import prune_checkpoints, save_checkpoint
from .fit import Decision, Record
from .step import TrainState

__all__ = ["Checkpoint", "EarlyStopping"]


class EarlyStopping:
    """Stop when ``monitor`` has not improved by ``min_delta`` for ``patience`` epochs.

    Args:
        monitor: a key of the epoch records, e.g. ``"val_loss"``.
        mode: ``"min"`` (lower is better) or ``"max"``.
        patience: epochs without improvement before stopping.
        min_delta: the smallest change that counts as an improvement.
    """

    def __init__(
        self,
        monitor: str = "val_loss",
        *,
        mode: Literal["min", "max"] = "min",
        patience: int = 5,
        min_delta: float = 0.0,
    ) -> None:
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', got {mode!r}")
        self.monitor, self.mode, self.patience, self.min_delta = monitor, mode, patience, min_delta

    def __call__(
        self, ts: TrainState | None, metrics: Mapping[str, float], history: Sequence[Record]
    ) -> Decision | None:
        sign = 1.0 if self.mode == "max" else -1.0
        values = [sign * h[self.monitor] for h in history if self.monitor in h]
        if not values:
            raise KeyError(
                f"EarlyStopping monitors {self.monitor!r}, which the epoch records lack "
                f"(they have {sorted(metrics)})"
            )
        best_at, best = 0, -math.inf
        for index, value in enumerate(values):
            if value > best + self.min_delta:
                best_at, best = index, value
        waited = len(values) - 1 - best_at
        if waited >= self.patience:
            return Decision(
                True,
                f"{self.monitor} has not improved for {waited} epochs (best {sign * best:.4g})",
            )
        return None


class Checkpoint:
    """Save every ``every`` epochs and at the end; keep the last ``keep_last`` and the best.

    Args:
        directory: where the ``epoch-NNNNNN.ckpt`` files go (created if needed).
        every: save after epochs ``every, 2 * every, ...`` (and after the last one).
        keep_last: how many of the latest to keep (0: all); the best is kept besides.
        monitor, mode: the record key that picks the best checkpoint; ``None``: no best.
        metadata: extra JSON-serialisable information stored in every file.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        every: int = 1,
        keep_last: int = 3,
        monitor: str | None = "val_accuracy",
        mode: Literal["min", "max"] = "max",
        metadata: Mapping[str, Any] | None = None,
    ) -> None:
        if every < 1:
            raise ValueError(f"every must be at least 1, got {every}")
        self.directory, self.every, self.keep_last = Path(directory), every, keep_last
        self.monitor, self.mode, self.metadata = monitor, mode, dict(metadata or {})

    def _save(self, ts: TrainState, history: Sequence[Record]) -> None:
        save_checkpoint(self.directory, ts, history, self.metadata)
        prune_checkpoints(self.directory, self.keep_last, self.monitor, self.mode)

    def __call__(
        self, ts: TrainState, metrics: Mapping[str, float], history: Sequence[Record]
    ) -> None:
        if int(metrics["epoch"]) % self.every == 0:
            self._save(ts, history)

    def on_end(self, ts: TrainState, history: Sequence[Record]) -> None:
        if history and int(history[-1]["epoch"]) % self.every:
            self._save(ts, history)  # the last epoch, when it was not a multiple of every
