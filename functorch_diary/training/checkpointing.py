"""A folder of epoch checkpoints: save, keep the last K and the best, find, load.

The behaviour of Orbax's ``CheckpointManager(max_to_keep=K, best_fn=...)`` and
Lightning's ``ModelCheckpoint(save_top_k=1, monitor=..., save_last=True)``, on files of
the project's safe format (:func:`functorch_diary.checkpoint.save`: atomic, digest
checked, no pickle). Each file is ``epoch-000007.ckpt``; its metadata holds the epoch,
that epoch's metrics, the whole history and whatever the caller adds (the CLI stores
the recipe and its settings), so the folder alone says how to resume and which is best.

Example:
    >>> import tempfile, torch
    >>> from torch import nn
    >>> from functorch_diary import Model, optim, init_train_state
    >>> model, opt = Model(lambda: nn.Linear(2, 1)), optim.sgd(0.1)
    >>> ts, folder = init_train_state(model, opt), tempfile.mkdtemp()
    >>> for epoch, acc in enumerate([0.5, 0.9, 0.7, 0.6], start=1):
    ...     _ = save_checkpoint(folder, ts, [{"epoch": epoch, "val_accuracy": acc}])
    ...     _ = prune_checkpoints(folder, keep_last=2, monitor="val_accuracy", mode="max")
    >>> [p.name for p in list_checkpoints(folder)]
    ['epoch-000002.ckpt', 'epoch-000003.ckpt', 'epoch-000004.ckpt']
    >>> best_checkpoint(folder, "val_accuracy", "max").name
    'epoch-000002.ckpt'
    >>> back, meta = load_checkpoint(latest_checkpoint(folder), like=ts)
    >>> meta["epoch"], torch.equal(back.params["weight"], ts.params["weight"])
    (4, True)
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from ..checkpoint import load, read_metadata, save
from .step import TrainState

__all__ = [
    "best_checkpoint",
    "checkpoint_path",
    "latest_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

_NAME = re.compile(r"epoch-(\d{6,})\.ckpt")


def checkpoint_path(directory: str | os.PathLike[str], epoch: int) -> Path:
    """Where the checkpoint of ``epoch`` goes: ``directory/epoch-{epoch:06d}.ckpt``."""
    return Path(directory) / f"epoch-{epoch:06d}.ckpt"


def list_checkpoints(directory: str | os.PathLike[str]) -> list[Path]:
    """The epoch checkpoints in ``directory``, oldest first (none if it does not exist)."""
    folder = Path(directory)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [path for _, path in sorted(found)]


def latest_checkpoint(directory: str | os.PathLike[str]) -> Path | None:
    """The checkpoint of the last epoch saved, or ``None``."""
    paths = list_checkpoints(directory)
    return paths[-1] if paths else None


def _score(path: Path, monitor: str, mode: str) -> float:
    value = read_metadata(path).get("metrics", {}).get(monitor)
    if not isinstance(value, (int, float)) or math.isnan(value):
        return -math.inf  # never the best: a checkpoint without the metric
    return value if mode == "max" else -value


def best_checkpoint(
    directory: str | os.PathLike[str], monitor: str, mode: Literal["min", "max"] = "max"
) -> Path | None:
    """The checkpoint whose ``metrics[monitor]`` is best (the earliest on a tie), or ``None``."""
    paths = list_checkpoints(directory)
    if not paths:
        return None
    scores = [_score(p, monitor, mode) for p in paths]
    return paths[scores.index(max(scores))]


def save_checkpoint(
    directory: str | os.PathLike[str],
    ts: TrainState,
    history: Sequence[Mapping[str, float]],
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Save ``ts`` atomically as the checkpoint of epoch ``history[-1]["epoch"]``.

    The metadata is ``{"epoch", "metrics": history[-1], "history", **metadata}``.
    """
    epoch = int(history[-1]["epoch"])
    path = checkpoint_path(directory, epoch)
    path.parent.mkdir(parents=True, exist_ok=True)
    info = {"epoch": epoch, "metrics": dict(history[-1]), "history": [dict(h) for h in history]}
    save(path, ts, metadata={**info, **(metadata or {})})
    return path


def prune_checkpoints(
    directory: str | os.PathLike[str],
    keep_last: int,
    monitor: str | None = None,
    mode: Literal["min", "max"] = "max",
) -> list[Path]:
    """Delete all but the last ``keep_last`` checkpoints and the best by ``monitor``.

    ``keep_last=0`` keeps every checkpoint. Returns the deleted paths.
    """
    paths = list_checkpoints(directory)
    if keep_last <= 0 or len(paths) <= keep_last:
        return []
    keep = set(paths[-keep_last:])
    if monitor is not None:
        keep.add(best_checkpoint(directory, monitor, mode))
    removed = [p for p in paths if p not in keep]
    for path in removed:
        path.unlink()
    return removed


def load_checkpoint(
    path: str | os.PathLike[str], like: TrainState
) -> tuple[TrainState, dict[str, Any]]:
    """The ``TrainState`` in ``path`` (checked against ``like``: same structure, shapes,
    dtypes; tensors on ``like``'s devices) and the file's metadata.

    Raises:
        CheckpointError: the file is damaged, forged, or for another model or optimiser.
    """
    return load(path, like=like), read_metadata(path)
