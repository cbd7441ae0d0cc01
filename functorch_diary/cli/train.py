"""``functorch-diary train NAME``: train a recipe and report test accuracy."""

from __future__ import annotations

import argparse
import csv
import time
from pathlib import Path

import torch

from ..training.fit import fit
from .args import device, non_negative_float, non_negative_int, output_dir, positive_int
from .errors import CliError, failure
from .recipes import RECIPES


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train",
        help="train a classifier (LeNet, MLP, logistic regression, ResNet-18, VGG16, DenseNet)",
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
    parser.add_argument("--epochs", type=positive_int, default=None, help="default: the recipe's")
    parser.add_argument(
        "--batch-size", type=positive_int, default=None, help="default: the recipe's"
    )
    parser.add_argument(
        "--lr", type=non_negative_float, default=None, help="default: the recipe's (0 allowed)"
    )
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--device", type=device, default="cuda" if torch.cuda.is_available() else "cpu"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile the step (default: on for CUDA, off on CPU)",
    )
    parser.add_argument("--out", type=output_dir, default=None, help="write metrics.csv here")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    parser.set_defaults(run=run)


def _given(value, default):
    # 0 is a value: only an option that was not given at all takes the recipe's default.
    return default if value is None else value


def _load(recipe, data_dir: Path | None):
    where = "the bundled data" if data_dir is None else f"--data-dir {data_dir}"
    with failure(
        f"reading {where}",
        "the file is damaged or not in the dataset's format: copy or unpack it again",
    ):
        return recipe.load_data(data_dir)


def run(args: argparse.Namespace) -> int:
    recipe = RECIPES[args.recipe]
    epochs = _given(args.epochs, recipe.epochs)
    batch_size = _given(args.batch_size, recipe.batch_size)
    lr = _given(args.lr, recipe.lr)
    start = time.perf_counter()
    if args.out is not None:
        with failure(f"creating --out {args.out}", "pick a folder you can write to", OSError):
            args.out.mkdir(parents=True, exist_ok=True)
    split = _load(recipe, args.data_dir)
    if batch_size > len(split.x_train):
        raise CliError(
            f"--batch-size {batch_size} is larger than the {len(split.x_train)} training "
            f"images: no step would run; pass --batch-size {len(split.x_train)} or less"
        )
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
