"""``functorch-diary evaluate CKPT``: a checkpoint's metrics on its recipe's test split.

``CKPT`` is a checkpoint file, or a ``train --out`` folder (its best checkpoint by the
recipe's validation metric, as Lightning's ``trainer.test(ckpt_path="best")``).
``--predictions FILE`` also writes the picture of its predictions on the first test
images, for a segmentation or detection recipe (the one ``train --out`` writes).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from ..training.step import make_eval_step
from .args import device, positive_int
from .errors import CliError, failure
from .runs import PICTURED, find_checkpoint, restore, write_predictions


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
    parser.add_argument(
        "--predictions",
        type=Path,
        default=None,
        metavar="PNG",
        help=f"also draw the predictions on the first {PICTURED} test images into this PNG "
        "(segmentation and detection recipes)",
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    path = find_checkpoint("checkpoint", args.checkpoint, which="best")
    recipe, ts, metadata = restore("checkpoint", path, args.device)
    if args.predictions is not None and recipe.draw is None:
        raise CliError(
            f"--predictions: the {recipe.name} recipe draws no prediction picture (only the "
            "segmentation and detection recipes do); drop the option"
        )
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
    if args.predictions is not None:
        write_predictions(recipe, ts, x_test, y_test, args.predictions, "--predictions")
        print(f"wrote {args.predictions}")
    return 0
