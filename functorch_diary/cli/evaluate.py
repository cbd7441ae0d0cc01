"""``functorch-diary evaluate CKPT``: a checkpoint's metrics on its recipe's test split.

``CKPT`` is a checkpoint file, or a ``train --out`` folder (its best checkpoint by the
recipe's validation metric, as Lightning's ``trainer.test(ckpt_path="best")``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..training.step import make_eval_step
from .args import device, positive_int
from .errors import failure
from .runs import find_checkpoint, restore


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate",
        help="print a checkpoint's metrics on the test split",
        description="Load a train checkpoint (or a run folder's best) and print its metrics "
        "on the test split of its recipe's data.",
    )
    parser.add_argument("checkpoint", type=Path, help="a .ckpt file or a train --out folder")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="default: the one the run trained on"
    )
    parser.add_argument(
        "--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument("--batch-size", type=positive_int, default=512)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = find_checkpoint("checkpoint", args.checkpoint, which="best")
    recipe, ts, metadata = restore("checkpoint", path, args.device)
    data_dir = args.data_dir
    if data_dir is None and metadata.get("data_dir") is not None:
        data_dir = Path(metadata["data_dir"])
    where = "the bundled data" if data_dir is None else f"--data-dir {data_dir}"
    with failure(f"reading {where}", "the file is damaged or not in the dataset's format"):
        split = recipe.load_data(data_dir)
    eval_step = make_eval_step(recipe.build_model(), recipe.loss_fn)
    x_test, y_test = split.x_test.to(args.device), split.y_test.to(args.device)
    metrics = recipe.evaluate(eval_step, ts, x_test, y_test)
    shown = ", ".join(f"test {k} {v:.4f}" for k, v in metrics.items())
    print(f"{path} ({recipe.name}, epoch {metadata['epoch']}, {len(y_test)} test images): {shown}")
    return 0
