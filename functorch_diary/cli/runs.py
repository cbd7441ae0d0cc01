"""A ``train --out DIR`` run on disk, as ``--resume``, ``evaluate`` and ``export`` read it.

``DIR/checkpoints/epoch-NNNNNN.ckpt`` hold the ``TrainState`` and, in their metadata,
the recipe's name and the run's settings (:data:`SETTINGS`), so a checkpoint alone
rebuilds the model, the optimiser and the data of its run. A recipe with a ``draw``
also leaves ``DIR/predictions.png`` (:func:`write_predictions`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor

from ..data.images import encode_png
from ..training.checkpointing import best_checkpoint, latest_checkpoint, load_checkpoint
from ..training.step import TrainState, init_train_state
from .errors import CliError, failure
from .recipes import RECIPES, Recipe

__all__ = [
    "PICTURED",
    "SETTINGS",
    "checkpoint_folder",
    "find_checkpoint",
    "restore",
    "write_predictions",
]

#: The options a run stores with each checkpoint and a resumed run must keep.
SETTINGS = ("epochs", "batch_size", "lr", "seed", "total_steps")

#: How many test images the prediction picture shows (the first ones of the split).
PICTURED = 8


def checkpoint_folder(run_dir: Path) -> Path:
    """Where ``train --out run_dir`` puts its checkpoints."""
    return run_dir / "checkpoints"


def find_checkpoint(option: str, path: Path, which: str = "latest") -> Path:
    """The checkpoint ``path`` names: the file itself, or in a run folder (or its
    ``checkpoints/``) the ``"latest"`` one or the ``"best"`` one by its recipe's monitor.

    Raises:
        CliError: nothing there is a checkpoint (the message names the option and path).
    """
    if path.is_file():
        return path
    if not path.is_dir():
        raise CliError(f"{option} {path}: no such file or folder; pass a run's --out folder "
                       "or one of its checkpoints/epoch-*.ckpt files")  # fmt: skip
    for folder in (checkpoint_folder(path), path):
        found = latest_checkpoint(folder)
        if found is None:
            continue
        if which == "best":
            with failure(f"reading {option} {found}", "the checkpoint is damaged"):
                recipe, _ = recipe_of(option, found)
                found = best_checkpoint(folder, f"val_{recipe.monitor}", recipe.mode) or found
        return found
    raise CliError(f"{option} {path}: no epoch-*.ckpt checkpoint in it or in "
                   f"{checkpoint_folder(path)}; train with --out to write some")  # fmt: skip


def recipe_of(option: str, path: Path) -> tuple[Recipe, dict[str, Any]]:
    """The recipe and metadata a checkpoint was written with."""
    from ..checkpoint import read_metadata

    with failure(f"reading {option} {path}", "the file is damaged or not a train checkpoint"):
        metadata = read_metadata(path)
    name = metadata.get("recipe")
    if name not in RECIPES or not all(key in metadata for key in SETTINGS):
        raise CliError(
            f"{option} {path}: not a checkpoint of the train command (its metadata names no "
            "known recipe and settings); pass one written by train --out"
        )
    return RECIPES[name], metadata


def restore(option: str, path: Path, device: str) -> tuple[Recipe, TrainState, dict[str, Any]]:
    """Rebuild the recipe's model and optimiser and load the ``TrainState`` of ``path``."""
    recipe, metadata = recipe_of(option, path)
    model = recipe.build_model()
    optimizer = recipe.make_optimizer(metadata["lr"], metadata["total_steps"])
    like = init_train_state(model, optimizer, metadata["seed"], device=device)
    with failure(f"reading {option} {path}", "the file is damaged or for another model"):
        ts, _ = load_checkpoint(path, like)
    return recipe, ts, metadata


def write_predictions(
    recipe: Recipe, ts: TrainState, images: Tensor, targets: Tensor, path: Path, option: str
) -> None:
    """Write ``recipe.draw``'s picture of the first :data:`PICTURED` ``images`` (moved to
    the state's device) and their ``targets`` to ``path`` as a PNG.

    Args:
        recipe: a recipe with a ``draw``.
        ts: the trained state whose predictions are drawn.
        images, targets: the test split (only the first :data:`PICTURED` are drawn).
        path: the PNG to write.
        option: the command-line option that named ``path``, for the error message.

    Raises:
        CliError: ``path`` cannot be written (the message names ``option`` and ``path``).
    """
    device = next(iter(ts.params.values())).device
    picture = recipe.draw(
        recipe.build_model(), ts, images[:PICTURED].to(device), targets[:PICTURED].to(device)
    )
    # Encoded here and written by Python: an unwritable path is an OSError naming it.
    data = encode_png(picture)
    with failure(f"writing {option} {path}", "pick a folder you can write to", OSError):
        path.write_bytes(data)
