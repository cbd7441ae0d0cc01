"""``python -m functorch_diary train NAME``: train a recipe and report test accuracy."""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from ..training.fit import fit
from .recipes import RECIPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train one of the diaries' models",
        description="Train a recipe: "
        + "; ".join(f"{r.name}: {r.description}" for r in RECIPES.values()),
    )
    parser.add_argument("recipe", choices=sorted(RECIPES), help="what to train")
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=None,
        help="read the dataset's standard files from here: MNIST IDX for the digit recipes "
        "(default: scikit-learn's bundled digits), CIFAR-10 python batches (required) for "
        "resnet, vgg and densenet",
    )
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--batch-size", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--lr", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the step (default: on for CUDA, off on CPU)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write metrics.csv here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    recipe = RECIPES[args.recipe]
    epochs = args.epochs or recipe.epochs
    batch_size = args.batch_size or recipe.batch_size
    lr = args.lr or recipe.lr
    start = time.perf_counter()
    split = recipe.load_data(args.data_dir)
    total_steps = epochs * (len(split.x_train) // batch_size)
    print(
        f"{recipe.name}: {len(split.x_train)} training and {len(split.x_test)} test images, "
        f"{epochs} epochs of batch {batch_size}, lr {lr}, on {args.device}"
    )
    result = fit(
        recipe.build_model(),
        recipe.make_optimizer(lr, total_steps),
        split,
        epochs=epochs,
        batch_size=batch_size,
        seed=args.seed,
        device=args.device,
        compile=args.compile,
        augment=recipe.augment,
        progress=not args.no_progress,
    )
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "metrics.csv", "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["epoch", "train_loss", "test_accuracy", "seconds"])
            writer.writerows(result.history)
    final = result.history[-1]
    print(
        f"test accuracy: {final.test_accuracy:.4f} ({len(split.x_test)} held-out images), "
        f"final train loss {final.train_loss:.4f}, {time.perf_counter() - start:.1f} s"
    )
    return 0
